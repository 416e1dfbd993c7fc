"""`llm-trainer serve` on a loopback port, driven by the official `openai` client: every answer must equal
`generate` run on the same prompt alone (greedy, and sampled with the same seed), also when many clients ask at
once and their requests are decoded in one continuously joined batch."""
from __future__ import annotations

import threading

import openai
import pytest
import torch

from llm_trainer.generation import GenerateConfig, generate
from llm_trainer.serve.loading import load_served_model
from serve_models import ServerProcess, make_llm_folder


QUESTIONS = ["hi", "How are you today?", "12 + 7 =", "The quick brown fox", "Tell me about café 東京",
             "A small model", "Numbers: 3 * 4", "Hello there!"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_llm_folder(tmp_path_factory.mktemp("serve") / "tiny-llm")


@pytest.fixture(scope="module")
def served(folder):
    return load_served_model(folder)


@pytest.fixture(scope="module")
def server(folder):
    srv = ServerProcess(folder, "--max-batch", "16", "--batch-wait-ms", "300")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def reference(served, messages, max_tokens, seed=None, ignore_eos=False, **sampling):
    """`generate` on this prompt alone: (text, completion ids, finish reason)."""
    ids = served.chat_prompt(messages).ids
    config = GenerateConfig(max_new_tokens=max_tokens, do_sample=seed is not None, **sampling)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out = generate(served.model, [ids], config, eos_token_ids=[] if ignore_eos else served.stop_token_ids,
                   generator=gen)
    done = out.finished[0]
    return served.tokenizer.decode(out.completions[0]), out.completions[0], "stop" if done else "length"


def _user(text):
    return [{"role": "user", "content": text}]


def test_models_endpoint(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-llm"]
    assert client.models.retrieve("tiny-llm").id == "tiny-llm"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


def test_chat_greedy_equals_generate(client, served):
    text, ids, reason = reference(served, _user("hi"), 24)
    r = client.chat.completions.create(model="tiny-llm", messages=_user("hi"), max_tokens=24, temperature=0)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == reason
    assert r.usage.completion_tokens == len(ids)
    assert r.usage.prompt_tokens == len(served.chat_prompt(_user("hi")).ids)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_chat_streaming_sends_deltas(client, served):
    messages = [{"role": "system", "content": "Be brief."}, *_user("How are you today?")]
    text, ids, reason = reference(served, messages, 40, ignore_eos=True)
    stream = client.chat.completions.create(model="tiny-llm", messages=messages, max_tokens=40, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 5, "the answer must arrive in many pieces"
    assert "".join(deltas) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length" == reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40 == len(ids)


def test_sampling_with_seed_equals_generate(client, served):
    kw = dict(temperature=0.9, top_p=0.8)
    text, _, _ = reference(served, _user("hi"), 30, seed=1234, top_k=40, repetition_penalty=1.2, **kw)
    r = client.chat.completions.create(model="tiny-llm", messages=_user("hi"), max_tokens=30, seed=1234, **kw,
                                       extra_body={"top_k": 40, "repetition_penalty": 1.2})
    assert r.choices[0].message.content == text
    # n samples: sample k uses seed + k
    r = client.chat.completions.create(model="tiny-llm", messages=_user("hi"), max_tokens=12, seed=7, n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for k, c in enumerate(r.choices):
        assert c.message.content == reference(served, _user("hi"), 12, seed=7 + k, **kw)[0]


def _concurrent(fn, args):
    out, errors = [None] * len(args), []

    def work(i):
        try:
            out[i] = fn(*args[i])
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return out


@pytest.mark.parametrize("clients", [4, 16])
def test_concurrent_clients_are_batched_and_exact(client, served, server, clients):
    """Requests of different lengths from many clients at once: each answer equals generate on it alone."""
    before = server.health()
    lengths = [8 + 5 * (i % 7) for i in range(clients)]
    args = [(QUESTIONS[i % len(QUESTIONS)], lengths[i], i % 3 == 0) for i in range(clients)]

    def ask(question, n, stream):
        kw = dict(model="tiny-llm", messages=_user(question), max_tokens=n, temperature=0,
                  extra_body={"ignore_eos": True})
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                           if c.choices)
        return client.chat.completions.create(**kw).choices[0].message.content

    answers = _concurrent(ask, args)
    for (question, n, _), answer in zip(args, answers):
        assert answer == reference(served, _user(question), n, ignore_eos=True)[0], question
    after = server.health()
    assert after["completed"] - before["completed"] == clients
    assert after["peak_batch"] >= min(clients, 4), after  # the requests really were decoded together


def test_continuous_batching_joins_running_batch(client, served, server):
    """A request that arrives while a long one is decoding joins the running batch (not after it)."""
    long_done = threading.Event()
    result = {}

    def long_request():
        result["long"] = client.chat.completions.create(model="tiny-llm", messages=_user("A small model"),
                                                        max_tokens=1500, temperature=0,
                                                        extra_body={"ignore_eos": True})
        long_done.set()

    t = threading.Thread(target=long_request)
    t.start()
    server.wait_until(lambda h: h["running"] >= 1, "the long request is decoding")
    short = client.chat.completions.create(model="tiny-llm", messages=_user("hi"), max_tokens=10, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert not long_done.is_set(), "the short request must finish while the long one is still running"
    t.join()
    assert short.choices[0].message.content == reference(served, _user("hi"), 10, ignore_eos=True)[0]
    assert result["long"].choices[0].message.content == reference(served, _user("A small model"), 1500,
                                                                  ignore_eos=True)[0]


def test_completions(client, served):
    tok = served.tokenizer
    prompts = ["The quick brown", "Hello"]
    r = client.completions.create(model="tiny-llm", prompt=prompts, max_tokens=10, temperature=0)
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1]
    for p, c in zip(prompts, r.choices):
        out = generate(served.model, [tok.encode(p)], GenerateConfig(max_new_tokens=10, do_sample=False),
                       eos_token_ids=served.stop_token_ids)
        assert c.text == tok.decode(out.completions[0])
    ids = tok.encode("Numbers: 12")
    r2 = client.completions.create(model="tiny-llm", prompt=ids, max_tokens=6, temperature=0)
    out = generate(served.model, [ids], GenerateConfig(max_new_tokens=6, do_sample=False),
                   eos_token_ids=served.stop_token_ids)
    assert r2.choices[0].text == tok.decode(out.completions[0])
    # the legacy default: 16 tokens
    r3 = client.completions.create(model="tiny-llm", prompt="Hello", temperature=0, extra_body={"ignore_eos": True})
    assert r3.usage.completion_tokens == 16 and r3.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-llm", prompt="The quick brown", max_tokens=10, temperature=0, stream=True))
    assert streamed == r.choices[0].text


def test_stop_strings_end_the_answer(client, served):
    full, _, _ = reference(served, _user("Hello there!"), 60, ignore_eos=True)
    # a stop string taken from the middle of the greedy answer (two characters long: it may span tokens)
    visible = [i for i in range(5, len(full) - 2) if full[i:i + 2].isprintable() and full[i:i + 2].strip()]
    assert visible, full
    cut = visible[0]
    stop = full[cut:cut + 2]
    first = full.index(stop)
    for stream in (False, True):
        kw = dict(model="tiny-llm", messages=_user("Hello there!"), max_tokens=60, temperature=0, stop=[stop],
                  extra_body={"ignore_eos": True})
        if stream:
            chunks = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            r = client.chat.completions.create(**kw)
            text, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert text == full[:first] and reason == "stop"


def test_many_clients_connecting_at_once(server):
    """64 clients open their connections at the same moment: none is refused or reset."""
    import http.client
    import json

    def one(i):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": [5, 6, i], "max_tokens": 2}),
                     headers={"Content-Type": "application/json"})
        status = conn.getresponse().status
        conn.close()
        return status

    assert _concurrent(one, [(i,) for i in range(64)]) == [200] * 64
