"""Sequence classification: the head equals transformers' ``*ForSequenceClassification`` (left and right padding), the
export loads there with equal logits, ``prepare_data classify`` (labels, errors naming file/line/field), the trainer's
loss and evaluation metrics against independent computations, the training options and learning."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llm_trainer import ClassifyConfig, LoRAConfig, ModelConfig, OptimConfig, TrainConfig
from llm_trainer.data.classify import ClassifyDataset, prepare_classify
from llm_trainer.data.formats import DataError
from llm_trainer.model import LlmModel
from llm_trainer.model.heads import SequenceClassifier
from llm_trainer.trainers.classify import ClassificationTrainer, classification_scores, confusion_matrix

VOCAB = 96
MC = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
ARCH = {"qwen2": dict(architecture="qwen2", attention_bias=True),
        "llama": dict(architecture="llama"),
        "qwen3": dict(architecture="qwen3", use_qk_norm=True)}


def batch(n=4, length=9, seed=0, side="right"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    lengths = [length - (3 * i) % (length - 2) for i in range(n)]
    mask = torch.zeros(n, length, dtype=torch.long)
    for i, L in enumerate(lengths):
        if side == "right":
            mask[i, :L] = 1
        else:
            mask[i, length - L:] = 1
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("arch", sorted(ARCH))
def test_export_is_a_transformers_classifier_with_equal_logits(tmp_path, arch):
    from transformers import AutoModelForSequenceClassification
    torch.manual_seed(0)
    model = SequenceClassifier(ModelConfig(**MC, **ARCH[arch]), 3, ["neg", "neutral", "pos"]).eval()
    model.save_pretrained(tmp_path / "clf", pad_token_id=0)
    hf_cfg = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert hf_cfg["architectures"] == [{"qwen2": "Qwen2", "llama": "Llama", "qwen3": "Qwen3"}[arch]
                                       + "ForSequenceClassification"]
    assert hf_cfg["num_labels"] == 3 and hf_cfg["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
    assert hf_cfg["label2id"] == {"neg": 0, "neutral": 1, "pos": 2} and hf_cfg["pad_token_id"] == 0
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf", dtype=torch.float32).eval()
    assert type(hf).__name__.endswith("ForSequenceClassification")
    loaded = SequenceClassifier.from_pretrained(tmp_path / "clf")
    assert loaded.label_names == ["neg", "neutral", "pos"]
    for side in ("right", "left"):
        ids, mask = batch(side=side)
        with torch.no_grad():
            ours = model(ids, mask)
            theirs = hf(input_ids=ids, attention_mask=mask).logits
            one_by_one = torch.cat([model(ids[i:i + 1, mask[i].bool()]) for i in range(len(ids))])
        # fp32; left padding shifts the RoPE positions of transformers by the padding (relative positions equal)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours, one_by_one, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(ids, mask), ours, rtol=0, atol=0)


def test_backbone_from_language_model_folder_skips_the_lm_head(tmp_path):
    torch.manual_seed(1)
    lm = LlmModel(ModelConfig(**MC))                       # untied: the folder has lm_head.weight
    lm.save_pretrained(tmp_path / "lm")
    clf = SequenceClassifier(ModelConfig(**MC), 2)
    clf.load_backbone(tmp_path / "lm")
    assert not hasattr(clf.backbone, "lm_head") or clf.backbone.lm_head is None
    ids, mask = batch()
    with torch.no_grad():
        h = lm.eval()(ids, attention_mask=mask, return_hidden_states=True).hidden_states
        last = h[torch.arange(len(ids)), mask.sum(1) - 1]
        torch.testing.assert_close(clf.eval()(ids, mask), last @ clf.score.weight.T, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="not a sequence-classifier folder"):
        clf.load_classifier(tmp_path / "lm")


# ------------------------------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from llm_trainer.tokenizer import train_tokenizer
    root = tmp_path_factory.mktemp("tok")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(f"{a}+{b}={a + b} is true. great film, bad film." for a in range(10)
                                for b in range(10)))
    return train_tokenizer([corpus], 290, root / "tok", template="chatml", show_progress=False)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_prepare_classify_string_labels_sorted_and_reused(tmp_path, tok):
    src = write_jsonl(tmp_path / "train.jsonl", [{"text": "great film", "label": "pos"},
                                                 {"text": "bad film", "label": "neg"}, "",
                                                 {"text": "3+4=7", "label": "pos"}])
    stats = prepare_classify(tok, src, tmp_path / "train", progress=False)
    assert stats.documents == 3
    ds = ClassifyDataset(tmp_path / "train")
    assert ds.label_names == ["neg", "pos"] and ds.num_labels == 2 and len(ds) == 3
    assert [int(ds[i]["labels"]) for i in range(3)] == [1, 0, 1]
    assert ds[0]["input_ids"].tolist() == tok.encode("great film")
    meta = json.loads((tmp_path / "train" / "meta.json").read_text())
    assert meta["label_counts"] == [1, 2] and meta["stage"] == "classify" and meta["tokenizer_sha256"]
    # held-out data with one class only keeps the training ids when given the training folder
    held = write_jsonl(tmp_path / "held.jsonl", [{"text": "bad", "label": "pos"}])
    prepare_classify(tok, held, tmp_path / "held", labels=tmp_path / "train", progress=False)
    assert ClassifyDataset(tmp_path / "held").label_names == ["neg", "pos"]
    assert int(ClassifyDataset(tmp_path / "held")[0]["labels"]) == 1
    # chat template and truncation
    prepare_classify(tok, src, tmp_path / "chat", template="chatml", max_length=6, progress=False)
    chat = ClassifyDataset(tmp_path / "chat")
    want = tok.apply_chat_template([{"role": "user", "content": "great film"}], add_generation_prompt=True,
                                   template="chatml").input_ids[:6]
    assert chat[0]["input_ids"].tolist() == want


def test_prepare_classify_int_labels_and_cli(tmp_path, tok):
    from llm_trainer.cli.prepare_data import main
    src = write_jsonl(tmp_path / "ints.jsonl", [{"text": "a b", "label": 2}, {"text": "c", "label": 0}])
    assert main(["--stage", "classify", "--tokenizer", str(tok.path), "--input", str(src), "--output",
                 str(tmp_path / "ints"), "--quiet"]) == 0
    ds = ClassifyDataset(tmp_path / "ints")
    assert ds.num_labels == 3 and ds.label_names == ["0", "1", "2"]
    assert [int(ds[i]["labels"]) for i in range(2)] == [2, 0]
    assert main(["--stage", "classify", "--tokenizer", str(tok.path), "--input", str(src), "--output",
                 str(tmp_path / "named"), "--labels", "x", "y", "z", "--quiet"]) == 0
    assert ClassifyDataset(tmp_path / "named").label_names == ["x", "y", "z"]


@pytest.mark.parametrize("row,field,why", [
    ({"label": "pos"}, "text", "missing field"),
    ({"text": "   ", "label": "pos"}, "text", "empty text"),
    ({"text": 3, "label": "pos"}, "text", "expected a string"),
    ({"text": "ok"}, "label", "missing label"),
    ({"text": "ok", "label": "maybe"}, "label", "unknown label 'maybe'"),
    ({"text": "ok", "label": 5}, "label", "unknown label 5"),
    ({"text": "ok", "label": 1.5}, "label", "must be a string or an int"),
    ('{"text": "ok", ', None, "malformed JSON"),
])
def test_prepare_classify_bad_records_name_file_line_field(tmp_path, tok, row, field, why):
    src = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine", "label": "neg"}, row])
    with pytest.raises(DataError) as e:
        prepare_classify(tok, src, tmp_path / "out", labels=["neg", "pos"], progress=False)
    assert e.value.file == str(src) and e.value.line == 2 and e.value.field == field and why in e.value.reason
    assert not (tmp_path / "out").exists()
    stats = prepare_classify(tok, src, tmp_path / "out", labels=["neg", "pos"], skip_bad=True, progress=False)
    assert stats.documents == 1 and stats.skipped == 1 and "line 2" in stats.skipped_examples[0]


# ---------------------------------------------------------------------------------------------------- trainer
def toy_items(n, seed):
    """Class = which of three marker tokens (10, 20, 30) the sequence holds; lengths vary."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        y = i % 3
        ids = torch.randint(40, VOCAB, (3 + (i * 5) % 7,), generator=g)
        ids[int(torch.randint(0, len(ids), (1,), generator=g))] = 10 * (y + 1)
        out.append({"input_ids": ids, "labels": torch.tensor(y)})
    return out


def make(tmp_path, data, name="clf", eval_data=None, lr=1e-3, max_steps=2, n_epochs=1, batch_size=4, lora=None,
         init=None, eval_interval=None, **cc):
    cfg = TrainConfig(model_config=ModelConfig(**MC), init_weights_path=init, file_dataset=data,
                      eval_file_dataset=eval_data, batch_size=batch_size, n_epochs=n_epochs, max_steps=max_steps,
                      output_dir=str(tmp_path / name), dtype="fp32", save_interval=None,
                      eval_interval=eval_interval, log_interval=1, ds_config=None, lora=lora, seed=3,
                      classify_config=ClassifyConfig(**{"num_labels": 3, **cc}),
                      optim_config=OptimConfig(initial_lr=lr, enable_lr_scheduler=False, weight_decay=0.0),
                      data_loader_config={"shuffle": False})
    return ClassificationTrainer(train_config=cfg)


def test_loss_and_eval_metrics_equal_an_independent_computation(tmp_path):
    data = toy_items(10, 0)
    weights = [0.5, 2.0, 1.0]
    tr = make(tmp_path, data, eval_data=data, class_weights=weights)
    model = tr.backend.unwrap(tr.model)
    b = tr.collate(data[:4])
    out = tr.compute_loss(tr.model, b)
    assert tr.count_units(b) == 4
    want, correct = 0.0, 0
    logits_all = []
    with torch.no_grad():
        for it in data:                                  # one unpadded sequence at a time, plain torch maths
            h = model.backbone(input_ids=it["input_ids"][None], return_hidden_states=True).hidden_states[0, -1]
            z = (h @ model.score.weight.T).double()
            logits_all.append(z)
    for z, it in zip(logits_all[:4], data[:4]):
        y = int(it["labels"])
        want += weights[y] * -(z[y] - torch.logsumexp(z, 0)).item()
        correct += int(z.argmax()) == y
    assert float(out.loss.detach()) == pytest.approx(want, rel=1e-5)
    assert float(out.metrics["accuracy"]) == correct
    m = tr.evaluate()
    cm = np.zeros((3, 3), int)
    for z, it in zip(logits_all, data):
        cm[int(it["labels"]), int(z.argmax())] += 1
    f1s = [2 * cm[c, c] / (cm[c].sum() + cm[:, c].sum()) for c in range(3) if cm[c].sum() + cm[:, c].sum()]
    assert m["eval_confusion_matrix"] == cm.tolist()
    assert m["eval_accuracy"] == pytest.approx(np.trace(cm) / 10)
    assert m["eval_macro_f1"] == pytest.approx(float(np.mean(f1s)))
    wl = sum(weights[int(it["labels"])] * -(z[int(it["labels"])] - torch.logsumexp(z, 0)).item()
             for z, it in zip(logits_all, data))
    assert m["eval_loss"] == pytest.approx(wl / 10, rel=1e-5)
    assert (tmp_path / "clf" / "confusion_matrix.png").is_file()
    record = [json.loads(x) for x in (tmp_path / "clf" / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["eval_confusion_matrix"] == cm.tolist()


def test_classification_scores_edge_cases():
    m = confusion_matrix(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1]), 4)
    assert m.tolist()[:2] == [[1, 1, 0, 0], [0, 2, 0, 0]]
    s = classification_scores(m)                          # classes 2 and 3 never occur: left out of the average
    assert s["accuracy"] == 0.75 and s["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)


def _params(model, prefix):
    return {k: v.detach().clone() for k, v in model.named_parameters() if k.startswith(prefix)}


@pytest.mark.parametrize("mode", ["head", "last_blocks", "lora"])
def test_training_options_train_only_what_they_say(tmp_path, mode):
    data = toy_items(16, 1)
    kw = {"lora": LoRAConfig(r=4, alpha=8)} if mode == "lora" else {"trainable": mode}
    tr = make(tmp_path, data, name=mode, lr=1e-2, max_steps=2, **kw)
    model = tr.backend.unwrap(tr.model)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    tr.train()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if mode == "head":
        assert trainable == {"score.weight"} and changed == {"score.weight"}
    elif mode == "last_blocks":
        assert changed == trainable and "score.weight" in changed and "backbone.model.norm.weight" in changed
        assert all(k.startswith(("backbone.model.layers.1.", "backbone.model.norm", "score")) for k in changed)
    else:
        assert changed == trainable and "score.weight" in changed
        assert all("lora_" in k or k == "score.weight" for k in changed)
        assert (tmp_path / mode / "lora_adapter").is_dir()
    # the export (LoRA merged) gives the trained model's logits
    loaded = SequenceClassifier.from_pretrained(tmp_path / mode / "final")
    ids, mask = batch(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), model.eval()(ids, mask), rtol=1e-5, atol=1e-5)


def test_lora_with_frozen_backbone_option_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot be combined with TrainConfig.lora"):
        make(tmp_path, toy_items(8, 0), lora=LoRAConfig(r=4), trainable="head")


def test_classifier_learns_and_continues_from_its_export(tmp_path):
    train, held = toy_items(96, 2), toy_items(24, 3)
    tr = make(tmp_path, train, name="learn", eval_data=held, lr=1e-3, max_steps=60, n_epochs=10, batch_size=8,
              eval_interval=30)
    before = tr.classification_metrics(held)
    last = tr.train()
    after = tr.classification_metrics(held)
    print(f"\nheld-out accuracy {before['accuracy']:.2f} -> {after['accuracy']:.2f}, loss {before['loss']:.3f} -> "
          f"{after['loss']:.3f}")
    assert after["accuracy"] >= 0.85 and after["accuracy"] > before["accuracy"] and after["loss"] < before["loss"]
    assert last["eval_accuracy"] == pytest.approx(after["accuracy"])
    # a new run from the exported classifier starts where this one ended (backbone and head loaded)
    again = make(tmp_path, train, name="again", init=str(tmp_path / "learn" / "final"))
    assert again.classification_metrics(held)["accuracy"] == pytest.approx(after["accuracy"])


def test_data_and_config_label_checks(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "great film", "label": "pos"}, {"text": "bad", "label": "neg"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "great film", "label": "pos"}, {"text": "ok", "label": "meh"}])
    prepare_classify(tok, a, tmp_path / "a", progress=False)
    prepare_classify(tok, b, tmp_path / "b", progress=False)
    cfg = dict(model_config=ModelConfig(**{**MC, "vocab_size": tok.vocab_size}), tokenizer=str(tok.path),
               batch_size=2, output_dir=str(tmp_path / "o"), ds_config=None, dtype="fp32", save_interval=None,
               eval_interval=None)
    with pytest.raises(DataError, match=r"classes \['meh', 'pos'\] differ from \['neg', 'pos'\]"):
        ClassificationTrainer(train_config=TrainConfig(file_dataset=str(tmp_path / "a"),
                                                       eval_file_dataset=str(tmp_path / "b"), **cfg))
    tr = ClassificationTrainer(train_config=TrainConfig(file_dataset=str(tmp_path / "a"), **cfg))
    assert tr.num_labels == 2 and tr.label_names == ["neg", "pos"]
    with pytest.raises(ValueError, match="class_weights"):
        ClassifyConfig(num_labels=2, class_weights=[1.0])
    with pytest.raises(ValueError, match="trainable"):
        ClassifyConfig(trainable="middle")
    assert math.isclose(sum(ClassifyConfig(class_weights=[1, 2]).class_weights), 3)
