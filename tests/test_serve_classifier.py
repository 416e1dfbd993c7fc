"""`/v1/rewards` on a real server for a sequence-classifier folder (a `ClassificationTrainer` export): each item's
logits equal `SequenceClassifier.predict` on the same token ids, the label is the most likely class and the
probabilities are their softmax; concurrent requests are batched; generation endpoints and the terminal chat refuse
the folder by name."""
from __future__ import annotations

import math

import pytest
import torch

from llm_trainer.serve.loading import folder_kind, load_served_model
from serve_models import ServerProcess, make_classifier_folder, post_concurrently, post_json as post


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_classifier_folder(tmp_path_factory.mktemp("serve_classifier") / "tiny-cls")


@pytest.fixture(scope="module")
def server(folder):
    srv = ServerProcess(folder, "--batch-wait-ms", "150", "--max-model-len", "256")
    yield srv
    srv.stop()


def test_logits_labels_and_probabilities_equal_the_classifier(server, folder):
    served = load_served_model(folder)
    assert folder_kind(folder) == "classifier" and served.kind == "classifier"
    tok = served.tokenizer
    conv = [{"role": "user", "content": "What a lovely day"}]
    items = ["The quick brown fox", "Hello there! How are you today?", {"messages": conv}]
    ids = [tok.encode(items[0]), tok.encode(items[1]), tok.apply_chat_template(conv).input_ids]
    expected = torch.cat([served.model.predict([i]) for i in ids])  # each alone
    status, body = post(server, {"model": "tiny-cls", "input": items})
    assert status == 200, body
    assert [d["object"] for d in body["data"]] == ["classification"] * 3
    got = torch.tensor([d["logits"] for d in body["data"]])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    names = ["negative", "neutral", "positive"]
    for d, row in zip(body["data"], expected):
        assert d["label"] == names[int(row.argmax())]
        assert list(d["probs"]) == names and math.isclose(sum(d["probs"].values()), 1.0, rel_tol=1e-9)
        torch.testing.assert_close(torch.tensor(list(d["probs"].values()), dtype=torch.float64),
                                   row.double().softmax(-1), atol=1e-6, rtol=0)
    assert len(set(map(tuple, got.tolist()))) == 3  # distinct inputs, distinct logits
    assert body["usage"]["prompt_tokens"] == sum(len(i) for i in ids)


def test_concurrent_requests_are_batched(server, folder):
    served = load_served_model(folder)
    texts = [f"item {i} " * (1 + i % 3) for i in range(6)]
    before = server.health()
    results = post_concurrently(server, [{"input": t} for t in texts])
    for text, (status, body) in zip(texts, results):
        assert status == 200, body
        alone = served.model.predict([served.tokenizer.encode(text)])[0]
        torch.testing.assert_close(torch.tensor(body["data"][0]["logits"]), alone, atol=1e-5, rtol=0)
    after = server.health()
    assert after["kind"] == "classifier" and after["scored"] - before["scored"] == len(texts)
    assert after["batches"] - before["batches"] < len(texts)


def test_generation_is_refused(server, folder):
    status, body = post(server, {"messages": [{"role": "user", "content": "hi"}]}, "/v1/chat/completions")
    assert status == 400 and body["error"]["code"] == "unsupported_endpoint"
    assert "classifier" in body["error"]["message"]
    from llm_trainer.serve.chat import ChatSession
    from llm_trainer.generation import GenerateConfig
    with pytest.raises(ValueError, match="classifier model; it scores text"):
        ChatSession(load_served_model(folder), GenerateConfig())
