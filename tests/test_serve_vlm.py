"""A VLM folder behind `llm-trainer serve`: images in OpenAI `image_url` parts (base64 data URLs, or file paths under
`--image-dir`) give the same answer as `generate` with the same pixel values, also for several requests with
different images batched together; image input that cannot be used is refused with a 400."""
from __future__ import annotations

import base64
import io
import threading

import openai
import pytest
import torch
from PIL import Image

from llm_trainer.generation import GenerateConfig, generate
from llm_trainer.serve.loading import load_served_model
from serve_models import ServerProcess, make_vlm_folder



def picture(seed: int, size: int = 24) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy())


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_vlm")
    folder = make_vlm_folder(root / "tiny-vlm")
    images = root / "images"
    images.mkdir()
    for i in range(3):
        picture(i).save(images / f"p{i}.png")
    srv = ServerProcess(folder, "--image-dir", str(images), "--batch-wait-ms", "300")
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
    yield load_served_model(folder), srv, client, images
    srv.stop()


def reference(served, text, images, n=12):
    msgs = [{"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]}]
    prompt = served.chat_prompt(msgs, images)
    out = generate(served.model, [prompt.ids], GenerateConfig(max_new_tokens=n, do_sample=False),
                   eos_token_ids=[], pixel_values=prompt.pixel_values)
    return served.tokenizer.decode(out.completions[0])


def ask(client, text, urls, n=12):
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}]
    r = client.chat.completions.create(model="tiny-vlm", messages=[{"role": "user", "content": content}],
                                       max_tokens=n, temperature=0, extra_body={"ignore_eos": True})
    return r.choices[0].message.content


def test_image_answers_equal_generate(setup):
    served, server, client, images = setup
    a = ask(client, "What is this?", [data_url(picture(0))])
    assert a == reference(served, "What is this?", [picture(0)])
    assert a != reference(served, "What is this?", [picture(1)])  # the image matters
    two = ask(client, "Compare", [data_url(picture(1)), "p2.png"])  # a data URL and a path under --image-dir
    assert two == reference(served, "Compare", [picture(1), str(images / "p2.png")])
    assert ask(client, "Plain text", []) == reference(served, "Plain text", [])


def test_requests_with_different_images_batch_together(setup):
    served, server, client, _ = setup
    jobs = [("first", [0]), ("second one", [1, 2]), ("third", []), ("fourth", [2])]
    out = [None] * len(jobs)
    before = server.health()

    def work(i):
        out[i] = ask(client, jobs[i][0], [data_url(picture(k)) for k in jobs[i][1]], n=20)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (text, ks), answer in zip(jobs, out):
        assert answer == reference(served, text, [picture(k) for k in ks], n=20), text
    assert server.health()["peak_batch"] >= 2 and server.health()["completed"] - before["completed"] == 4


@pytest.mark.parametrize("url,word", [
    ("https://example.com/cat.png", "remote image URLs are not fetched"),
    ("data:image/png;base64,!!!", "not valid base64"),
    ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "readable image"),
    ("../outside.png", "must lie inside"),
    ("missing.png", "no such image file"),
])
def test_unusable_images_are_refused(setup, url, word):
    _, _, client, _ = setup
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "x", [url])
    assert word in str(e.value)
    assert ask(client, "still fine", [], n=2)
