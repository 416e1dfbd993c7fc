"""`/v1/rewards` on a real server for a `RewardModel` folder: scores equal `RewardModel.score` on the same token ids
(conversations rendered with the chat template, as reward training data is), concurrent requests are scored in
one batch, and bad input gets OpenAI-style errors."""
from __future__ import annotations


import pytest
import torch

from llm_trainer.serve.loading import load_served_model
from serve_models import ServerProcess, make_reward_folder, post_concurrently, post_json as post


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_reward_folder(tmp_path_factory.mktemp("serve_reward") / "tiny-rm")


@pytest.fixture(scope="module")
def server(folder):
    srv = ServerProcess(folder, "--batch-wait-ms", "150", "--max-model-len", "256")
    yield srv
    srv.stop()


def test_scores_equal_reward_model(server, folder):
    served = load_served_model(folder)
    tok = served.tokenizer
    conv = [{"role": "user", "content": "What is 12 + 7?"}, {"role": "assistant", "content": "19"}]
    items = ["plain text to score", {"messages": conv},
             {"prompt": "What is 12 + 7?", "response": "20"},
             {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
              "response": [{"role": "assistant", "content": "Hello!"}]}]
    ids = [tok.encode(items[0]), tok.apply_chat_template(conv).input_ids,
           tok.apply_chat_template([conv[0], {"role": "assistant", "content": "20"}]).input_ids,
           tok.apply_chat_template(items[3]["prompt"] + items[3]["response"]).input_ids]
    expected = torch.cat([served.model.score([i], [[]]) for i in ids])  # each alone
    status, body = post(server, {"model": "tiny-rm", "input": items})
    assert status == 200, body
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1, 2, 3]
    got = torch.tensor([d["score"] for d in body["data"]])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert body["usage"]["prompt_tokens"] == sum(len(i) for i in ids)
    assert len(set(got.tolist())) == 4  # distinct inputs, distinct scores
    status, one = post(server, {"input": {"messages": conv}})
    assert status == 200 and abs(one["data"][0]["score"] - float(expected[1])) < 1e-5


def test_concurrent_requests_are_scored_together(server, folder):
    served = load_served_model(folder)
    texts = [f"answer number {i} " * (1 + i % 4) for i in range(8)]
    before = server.health()
    results = post_concurrently(server, [{"input": t} for t in texts])
    for text, (status, body) in zip(texts, results):
        assert status == 200, body
        alone = float(served.model.score([served.tokenizer.encode(text)], [[]])[0])
        assert abs(body["data"][0]["score"] - alone) < 1e-5
    after = server.health()
    assert after["kind"] == "reward" and after["scored"] - before["scored"] == len(texts)
    assert after["peak_batch"] >= 2, after


@pytest.mark.parametrize("body,status,word", [
    ({}, 400, "input"),
    ({"input": []}, 400, "input"),
    ({"input": [3]}, 400, "input[0]"),
    ({"input": [{"role": "user", "content": "x"}]}, 400, "wrap a conversation"),
    ({"input": {"messages": [{"role": "robot", "content": "x"}]}}, 400, "role"),
    ({"input": "x" * 3000}, 400, "maximum context length is 256"),
    ({"input": "x", "model": "other"}, 404, "does not exist"),
    ({"input": "x", "extra": 1}, 400, "extra"),
])
def test_bad_reward_requests(server, body, status, word):
    got, err = post(server, body)
    assert got == status and word in err["error"]["message"], err
    assert post(server, {"input": "still alive"})[0] == 200


def test_generation_endpoints_refused(server):
    status, err = post(server, {"messages": [{"role": "user", "content": "hi"}]}, "/v1/chat/completions")
    assert status == 400 and err["error"]["code"] == "unsupported_endpoint"
    status, err = post(server, {"prompt": "hi"}, "/v1/completions")
    assert status == 400 and "reward model" in err["error"]["message"]
