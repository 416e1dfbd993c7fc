"""Data prepared with tokenizer A and trained with tokenizer B fails at open, naming both (real tokenizers, real
prepare_data output, real meta.json files)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from llm_trainer.data import DataError, PretrainDataset, SFTDataset, open_dataset
from llm_trainer.data.prepare import prepare
from llm_trainer.data.provenance import (check_tokenizer, flat_meta_path, read_flat_meta, tokenizer_fingerprint,
                                         tokenizer_record, write_flat_meta)
from llm_trainer.tokenizer import Tokenizer, train_tokenizer

CHATS = [{"messages": [{"role": "user", "content": f"what is {a}+{b}?"},
                       {"role": "assistant", "content": f"{a + b}"}]} for a in range(12) for b in range(12)]
PROSE = [" ".join(w * (1 + i % 3) for w in ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing",
                                              "elit", "sed", "eiusmod", "tempor", "incididunt", "labore", "magna"))
         for i in range(30)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tokenizer A, B (another vocabulary size) and C (A's size, trained on other text), and SFT data from A."""
    root = tmp_path_factory.mktemp("provenance")
    chats = root / "chats.jsonl"
    chats.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    prose = root / "prose.jsonl"
    prose.write_text("".join(json.dumps({"text": t}) + "\n" for t in PROSE * 5))
    for name, files, size in (("A", [chats, prose], 300), ("B", [chats, prose], 310), ("C", [prose], 300)):
        train_tokenizer([str(f) for f in files], vocab_size=size, output_dir=root / name, show_progress=False)
    prepare("sft", Tokenizer(root / "A"), chats, root / "sft_A", progress=False)
    return root


def _meta(folder):
    return json.loads((folder / "meta.json").read_text())


def test_fingerprint_tells_vocabularies_apart(workspace):
    a, c = Tokenizer(workspace / "A"), Tokenizer(workspace / "C")
    assert a.vocab_size == c.vocab_size and tokenizer_fingerprint(a) != tokenizer_fingerprint(c)
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(Tokenizer(workspace / "A" / "tokenizer.json"))
    assert tokenizer_fingerprint(object()) is None


def test_prepared_with_one_tokenizer_trained_with_another_vocab_size(workspace):
    data, b = workspace / "sft_A", Tokenizer(workspace / "B")
    assert _meta(data)["tokenizer"] == str(workspace / "A" / "tokenizer.json")   # what prepare_data records today
    with pytest.raises(DataError) as e:
        SFTDataset(data, tokenizer=b)
    msg = str(e.value)
    assert str(data / "meta.json") in msg and str(workspace / "A" / "tokenizer.json") in msg
    assert str(workspace / "B" / "tokenizer.json") in msg and "vocabulary size 300 vs 310" in msg
    assert "prepare_data" in msg
    with pytest.raises(DataError, match="vocabulary size 300 vs 310"):
        open_dataset("sft", [str(data)], 64, tokenizer=b)
    assert len(SFTDataset(data, tokenizer=Tokenizer(workspace / "A"))) == len(CHATS)   # the right one passes


def test_same_size_other_vocabulary_found_through_the_recorded_tokenizer_file(workspace):
    """meta.json from today's prepare_data has no fingerprint: the recorded tokenizer file is hashed instead."""
    with pytest.raises(DataError, match=r"vocabulary fingerprint \(sha256\) [0-9a-f]{12}… vs [0-9a-f]{12}…"):
        SFTDataset(workspace / "sft_A", tokenizer=Tokenizer(workspace / "C"))


def test_a_recorded_fingerprint_is_compared_when_the_tokenizer_file_is_gone(workspace, tmp_path):
    a = Tokenizer(workspace / "A")
    data = tmp_path / "sft"
    shutil.copytree(workspace / "sft_A", data)
    meta = _meta(data)
    meta.update(tokenizer_record(a), tokenizer="/gone/tokenizer.json")   # a meta.json naming a tokenizer not here
    (data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"prepared with the tokenizer /gone/tokenizer\.json, but training uses .*C/"
                                        r"tokenizer\.json: vocabulary fingerprint"):
        SFTDataset(data, tokenizer=Tokenizer(workspace / "C"))
    copy = tmp_path / "A_copy"                                          # the same tokenizer elsewhere: fine
    shutil.copytree(workspace / "A", copy)
    assert len(SFTDataset(data, tokenizer=Tokenizer(copy))) == len(CHATS)
    del meta["tokenizer_sha256"]                                        # nothing left to compare but size and EOS
    (data / "meta.json").write_text(json.dumps(meta))
    assert len(SFTDataset(data, tokenizer=Tokenizer(workspace / "C"))) == len(CHATS)


def test_an_eos_id_mismatch_is_reported(workspace, tmp_path):
    data = tmp_path / "sft"
    shutil.copytree(workspace / "sft_A", data)
    meta = _meta(data)
    meta["eos_token_id"] += 1
    (data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"EOS id \d+ vs \d+"):
        SFTDataset(data, tokenizer=Tokenizer(workspace / "A"))


def test_folders_written_without_a_tokenizer_record_are_not_checked(workspace, tmp_path):
    from llm_trainer.data import IndexedWriter
    with IndexedWriter(tmp_path / "sft", "sft", vocab_size=512) as w:   # a model's vocab, not a tokenizer's
        w.add_sft([1, 2, 3], [0, 1, 1])
    assert len(SFTDataset(tmp_path / "sft", tokenizer=Tokenizer(workspace / "B"))) == 1


def test_flat_pretraining_file_sidecar(workspace, tmp_path):
    a, b, c = (Tokenizer(workspace / n) for n in "ABC")
    np.save(tmp_path / "t.npy", np.arange(200, dtype=np.uint16) % 250)
    assert read_flat_meta(tmp_path / "t.npy") is None
    assert len(PretrainDataset(tmp_path / "t.npy", 16, tokenizer=b)) == 12      # no sidecar: nothing to compare
    assert write_flat_meta(tmp_path / "t.npy", tokenizer_record(a)) == flat_meta_path(tmp_path / "t.npy")
    assert (tmp_path / "t.npy.meta.json").is_file()
    assert len(PretrainDataset(tmp_path / "t.npy", 16, tokenizer=a)) == 12
    for other, why in ((b, "vocabulary size 300 vs 310"), (c, "vocabulary fingerprint")):
        with pytest.raises(DataError, match=rf"t\.npy: the data was prepared with the tokenizer .*A/tokenizer\.json, "
                                            rf"but training uses .*: {why}"):
            open_dataset("pretrain", str(tmp_path / "t.npy"), 16, tokenizer=other)
    (tmp_path / "t.npy.meta.json").write_text("[1, 2")
    with pytest.raises(DataError, match=r"t\.npy\.meta\.json: invalid JSON"):
        PretrainDataset(tmp_path / "t.npy", 16)


def test_a_pretraining_run_with_another_tokenizer_fails_before_the_first_step(workspace, tmp_path):
    from llm_trainer import Trainer
    from llm_trainer.configs import TrainConfig
    from llm_trainer.model import ModelConfig

    np.save(tmp_path / "t.npy", np.arange(4096, dtype=np.uint16) % 300)
    write_flat_meta(tmp_path / "t.npy", tokenizer_record(Tokenizer(workspace / "A")))
    cfg = TrainConfig(model_config=ModelConfig(vocab_size=320, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, max_position_embeddings=64),
                      tokenizer=str(workspace / "C"), file_dataset=[str(tmp_path / "t.npy")],
                      dataset_block_size=32, batch_size=2, max_steps=2, output_dir=str(tmp_path / "run"),
                      dtype="fp32", save_interval=None)
    with pytest.raises(DataError, match=r"t\.npy: the data was prepared with the tokenizer .*A/tokenizer\.json, but "
                                        r"training uses .*C/tokenizer\.json: vocabulary fingerprint"):
        Trainer(train_config=cfg)


def test_check_tokenizer_needs_a_tokenizer_and_a_record(workspace):
    check_tokenizer({"vocab_size": 1}, Tokenizer(workspace / "A"), file="x")        # no record: not checked
    check_tokenizer({"tokenizer": "x", "vocab_size": 1}, None, file="x")             # no tokenizer: not checked
