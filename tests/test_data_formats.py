"""Token formats and datasets: memory-mapped reading, the indexed layout, O(1) items, bad files, the 1 GB RSS test."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from llm_trainer.data import (ConcatFileDataset, DataError, DPODataset, FileDataset, IndexedWriter, PretrainDataset,
                              RLDataset, SFTDataset, StreamingPretrainDataset, open_dataset, token_dtype)
from llm_trainer.data.formats import NpyWriter

V = 500


def _write_sft(path, records, vocab=V, images=None):
    with IndexedWriter(path, "sft", vocab, has_images=images is not None) as w:
        for k, (ids, mask) in enumerate(records):
            w.add_sft(ids, mask, images=None if images is None else images[k])
    return path


# ------------------------------------------------------------------------------------------------ flat / raw files
def test_token_dtype():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_pretrain_npy_windows_and_stride(tmp_path):
    tokens = np.arange(100, dtype=np.uint16)
    np.save(tmp_path / "t.npy", tokens)
    ds = PretrainDataset(tmp_path / "t.npy", block_size=32)
    assert len(ds) == 3                        # (100 - 32) // 32 + 1
    assert ds[1]["input_ids"].dtype == torch.long
    assert ds[1]["input_ids"].tolist() == list(range(32, 64))
    assert ds[-1]["input_ids"].tolist() == list(range(64, 96))
    ds2 = PretrainDataset(tmp_path / "t.npy", block_size=32, stride=16)
    assert len(ds2) == (100 - 32) // 16 + 1
    assert ds2[3]["input_ids"][0].item() == 48
    with pytest.raises(IndexError):
        ds[3]
    short = PretrainDataset(tmp_path / "t.npy", block_size=1000)  # shorter than one block: one item
    assert len(short) == 1 and len(short[0]["input_ids"]) == 100


def test_npy_writer_streams_and_reads_back(tmp_path):
    w = NpyWriter(tmp_path / "s.npy", np.uint32)
    for k in range(5):
        w.write(np.arange(k * 10, k * 10 + 10))
    w.close()
    a = np.load(tmp_path / "s.npy", mmap_mode="r")
    assert a.dtype == np.uint32 and a.tolist() == list(range(50))


def test_raw_bin_needs_dtype(tmp_path):
    np.arange(64, dtype=np.uint32).tofile(tmp_path / "t.bin")
    with pytest.raises(DataError, match=r"t\.bin: a raw token dump has no header, so its dtype must be stated"):
        PretrainDataset(tmp_path / "t.bin", 16)
    ds = PretrainDataset(tmp_path / "t.bin", 16, dtype="uint32")
    assert ds[3]["input_ids"].tolist() == list(range(48, 64))
    # uint32 data read as uint16 "works" (sizes divide); an odd size is reported
    with open(tmp_path / "odd.bin", "wb") as f:
        f.write(b"\x00" * 7)
    with pytest.raises(DataError, match=r"odd\.bin: size 7 bytes is not a multiple of 2 \(uint16\): wrong dtype or "
                                        r"a truncated file"):
        PretrainDataset(tmp_path / "odd.bin", 4, dtype="uint16")


def test_pickled_arrays_refused_without_allow_pickle(tmp_path):
    obj = np.empty(2, dtype=object)
    obj[0], obj[1] = [1, 2, 3], [4, 5]
    np.save(tmp_path / "old.npy", obj, allow_pickle=True)
    with pytest.raises(DataError, match=r"old\.npy: refusing to load this file without allow_pickle=True: it holds "
                                        r"Python objects, and loading those unpickles them, which can run arbitrary "
                                        r"code"):
        SFTDataset(tmp_path / "old.npy")
    with pytest.warns(UserWarning, match="carry no loss mask"):
        ds = SFTDataset(tmp_path / "old.npy", allow_pickle=True)
    assert ds[1]["input_ids"].tolist() == [4, 5] and ds[1]["labels"].tolist() == [4, 5]

    with open(tmp_path / "flat.pkl", "wb") as f:
        pickle.dump(list(range(40)), f)
    with pytest.raises(DataError, match=r"flat\.pkl: refusing to load this file without allow_pickle=True"):
        PretrainDataset(tmp_path / "flat.pkl", 8)
    assert PretrainDataset(tmp_path / "flat.pkl", 8, allow_pickle=True)[4]["input_ids"].tolist() == list(range(32, 40))


def test_legacy_dpo_and_rl_with_allow_pickle(tmp_path):
    pairs = [{"chosen": [1, 2, 3, 7, 8], "rejected": [1, 2, 3, 9]}]
    with open(tmp_path / "dpo.pkl", "wb") as f:
        pickle.dump(pairs, f)
    item = DPODataset(tmp_path / "dpo.pkl", allow_pickle=True)[0]
    assert item["chosen_labels"].tolist() == [-100, -100, -100, 7, 8]      # shared prefix = prompt, masked
    assert item["rejected_labels"].tolist() == [-100, -100, -100, 9]
    rl = np.empty(1, dtype=object)
    rl[0] = {"prompt": [5, 6], "answer": [7]}
    np.save(tmp_path / "rl.npy", rl, allow_pickle=True)
    item = RLDataset(tmp_path / "rl.npy", allow_pickle=True)[0]
    assert item["prompt_ids"].tolist() == [5, 6] and item["answer_ids"].tolist() == [7]


# ---------------------------------------------------------------------------------------------- bad token files
def test_wrong_dtype(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros(10, np.float32))
    with pytest.raises(DataError, match=r"f\.npy: tokens have dtype float32, but token files must hold integers"):
        PretrainDataset(tmp_path / "f.npy", 4)


def test_truncated_npy(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(1000, dtype=np.uint16))
    size = os.path.getsize(tmp_path / "t.npy")
    with open(tmp_path / "t.npy", "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(DataError, match=r"t\.npy: truncated \.npy file: the header declares 1000 items of uint16 "
                                        r"\(2128 bytes with the header\) but the file has 2028 bytes"):
        PretrainDataset(tmp_path / "t.npy", 4)
    with open(tmp_path / "h.npy", "wb") as f:
        f.write(open(tmp_path / "t.npy", "rb").read()[:40])     # header cut off
    with pytest.raises(DataError, match=r"h\.npy: truncated \.npy file: the header is cut off"):
        PretrainDataset(tmp_path / "h.npy", 4)


def test_empty_files(tmp_path):
    (tmp_path / "e.npy").write_bytes(b"")
    with pytest.raises(DataError, match=r"e\.npy: file is empty \(0 bytes\)"):
        PretrainDataset(tmp_path / "e.npy", 4)
    np.save(tmp_path / "z.npy", np.zeros(0, np.uint16))
    with pytest.raises(DataError, match=r"z\.npy: the file holds no tokens"):
        PretrainDataset(tmp_path / "z.npy", 4)
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match=r"e\.jsonl: file is empty \(0 bytes\)"):
        StreamingPretrainDataset(tmp_path / "e.jsonl", tokenizer=object(), block_size=4)


def test_an_id_beyond_the_vocabulary_deep_in_a_flat_file_fails_at_open(tmp_path):
    """A bad id in the middle of a 10M-token file (past the first scan chunk) is found when the dataset is opened, not
    when its window is sampled: the error names the file, the position, the id and the vocabulary size."""
    n, bad_at = 10_000_000, 6_123_457
    w = NpyWriter(tmp_path / "t.npy", np.uint16)
    for start in range(0, n, 1 << 20):
        w.write(np.arange(start, min(n, start + (1 << 20))) % V)
    w.close()
    tokens = np.load(tmp_path / "t.npy", mmap_mode="r+")
    tokens[bad_at] = 600
    tokens.flush()
    del tokens
    with pytest.raises(DataError, match=rf"t\.npy: token id 600 at position {bad_at} is >= the vocabulary size 500"):
        PretrainDataset(tmp_path / "t.npy", 16, vocab_size=V)
    with pytest.raises(DataError, match=rf"position {bad_at}"):
        open_dataset("pretrain", [str(tmp_path / "t.npy")], 16, vocab_size=V)
    assert len(PretrainDataset(tmp_path / "t.npy", 16, vocab_size=601)) == n // 16   # fits a larger vocabulary
    signed = np.arange(100, dtype=np.int32)
    signed[70] = -5                                                  # signed files: negative ids, even without a vocab
    np.save(tmp_path / "s.npy", signed)
    with pytest.raises(DataError, match=r"s\.npy: negative token id -5 at position 70"):
        PretrainDataset(tmp_path / "s.npy", 16)


def test_a_pretraining_run_on_a_file_with_a_bad_id_fails_before_the_first_step(tmp_path):
    from llm_trainer import Trainer
    from llm_trainer.configs import TrainConfig
    from llm_trainer.model import ModelConfig

    tokens = np.arange(4096, dtype=np.uint16) % 64
    tokens[3000] = 64
    np.save(tmp_path / "t.npy", tokens)
    cfg = TrainConfig(model_config=ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, max_position_embeddings=64),
                      file_dataset=[str(tmp_path / "t.npy")], dataset_block_size=32, batch_size=2, max_steps=2,
                      output_dir=str(tmp_path / "run"), dtype="fp32", save_interval=None)
    with pytest.raises(DataError, match=r"t\.npy: token id 64 at position 3000 is >= the vocabulary size 64"):
        Trainer(train_config=cfg)                                    # the constructor: before any step


def test_an_id_beyond_the_vocabulary_in_indexed_data_fails_at_open_naming_the_record(tmp_path):
    _write_sft(tmp_path / "sft", [([1, 2, 3], [0, 1, 1]), ([4, 5, 6, 7], [0, 1, 1, 1]), ([8, 9], [1, 1])])
    tokens = np.load(tmp_path / "sft" / "tokens.npy")
    tokens[5] = 499                                                  # record 1, position 5 of tokens.npy
    np.save(tmp_path / "sft" / "tokens.npy", tokens)
    assert len(SFTDataset(tmp_path / "sft", vocab_size=V)) == 3
    with pytest.raises(DataError, match=r"sft/tokens\.npy, record 1, field 'tokens': token id 499 at position 5 is "
                                        r">= the vocabulary size 100"):
        SFTDataset(tmp_path / "sft", vocab_size=100)
    with IndexedWriter(tmp_path / "dpo", "dpo", V) as w:              # pairs: sequence 2k+1 is record k's rejected
        w.add_pair([1, 2, 3], [0, 1, 1], [1, 2, 4], [0, 1, 1], prompt_length=1)
        w.add_pair([1, 5], [0, 1], [1, 6, 7], [0, 1, 1], prompt_length=1)
    tokens = np.load(tmp_path / "dpo" / "tokens.npy")
    tokens[10] = 300                                                  # the last token: record 1's rejected sequence
    np.save(tmp_path / "dpo" / "tokens.npy", tokens)
    with pytest.raises(DataError, match=r"record 1, field 'tokens': token id 300 at position 10"):
        DPODataset(tmp_path / "dpo", vocab_size=200)
    with IndexedWriter(tmp_path / "rl", "rl", V, has_answers=True) as w:
        w.add_rl([9, 8, 7], [4, 2], "42")
        w.add_rl([6], [450], "x")
    with pytest.raises(DataError, match=r"rl/answer_tokens\.npy, record 1, field 'answer_tokens': token id 450 at "
                                        r"position 2"):
        RLDataset(tmp_path / "rl", vocab_size=400)
    with pytest.raises(DataError, match=r"record 0, field 'input_ids': token id 600 is outside the vocabulary "
                                        r"\[0, 500\)"):
        _write_sft(tmp_path / "bad", [([1, 600], [1, 1])])
    assert not (tmp_path / "bad").exists()


def test_legacy_pickled_data_is_scanned_at_open_too(tmp_path):
    with open(tmp_path / "old.pkl", "wb") as f:
        pickle.dump([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 700], "labels": [4, 700]}], f)
    with pytest.raises(DataError, match=r"old\.pkl/tokens\.npy, record 1, field 'tokens': token id 700 at position 4"):
        SFTDataset(tmp_path / "old.pkl", vocab_size=V, allow_pickle=True)


def test_indexed_folder_damage_is_reported(tmp_path):
    d = _write_sft(tmp_path / "sft", [([1, 2, 3], [0, 1, 1]), ([4, 5], [1, 1])])
    assert SFTDataset(d)[1]["input_ids"].tolist() == [4, 5]
    np.save(d / "offsets.npy", np.array([0, 3, 4], np.int64))
    with pytest.raises(DataError, match=r"offsets\.npy: offsets must start at 0 and end at the length of tokens\.npy "
                                        r"\(5\), found 0\.\.4"):
        SFTDataset(d)[0]
    os.remove(d / "loss_mask.npy")
    np.save(d / "offsets.npy", np.array([0, 3, 5], np.int64))
    with pytest.raises(DataError, match=r"sft: missing loss_mask\.npy"):
        SFTDataset(d)[0]
    (d / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match=r"meta\.json: invalid JSON"):
        SFTDataset(d)
    with pytest.raises(DataError, match=r"nowhere: dataset not found"):
        SFTDataset(tmp_path / "nowhere")
    np.save(tmp_path / "rect.npy", np.ones((4, 8), np.int32))
    with pytest.raises(DataError, match=r"rect\.npy: a plain int32 array \(\(4, 8\)\) has no sample boundaries"):
        SFTDataset(tmp_path / "rect.npy")


# ---------------------------------------------------------------------------------------------- indexed datasets
def test_sft_dataset_labels_truncation_and_images(tmp_path):
    img = 7
    recs = [([1, img, 2, 3, 4], [0, 0, 0, 1, 1]), ([img, 5, img, 6, 8, 9, 10], [0, 0, 0, 0, 1, 1, 1])]
    d = _write_sft(tmp_path / "sft", recs, images=[["a.png"], ["b.png", "c.png"]])
    meta = json.loads((d / "meta.json").read_text())
    meta["image_token_id"] = img
    (d / "meta.json").write_text(json.dumps(meta))
    ds = SFTDataset(d)
    assert ds[0]["labels"].tolist() == [-100, -100, -100, 3, 4]
    assert ds[1]["images"] == ["b.png", "c.png"]
    with pytest.warns(UserWarning, match=r"1 of 2 samples are longer than block_size=5 and are truncated"):
        short = SFTDataset(d, block_size=5)
    assert short.num_truncated == 1
    assert short[0]["input_ids"].tolist() == [1, img, 2, 3, 4]
    assert short[1]["input_ids"].tolist() == [img, 5, img, 6, 8]
    assert short[1]["images"] == ["b.png", "c.png"]
    with pytest.warns(UserWarning, match="2 of 2 samples"):
        tiny = SFTDataset(d, block_size=2)
    assert tiny[1]["images"] == ["b.png"]        # the second placeholder was cut off, and so is its image
    with pytest.raises(DataError, match=r"this is 'sft' data; expected 'dpo' or 'reward'"):
        DPODataset(d)


def test_dpo_and_rl_datasets(tmp_path):
    with IndexedWriter(tmp_path / "dpo", "dpo", V) as w:
        w.add_pair([1, 2, 3, 4], [0, 0, 1, 1], [1, 2, 5], [0, 0, 1], prompt_length=2)
    item = DPODataset(tmp_path / "dpo")[0]
    assert item["chosen_input_ids"].tolist() == [1, 2, 3, 4]
    assert item["chosen_labels"].tolist() == [-100, -100, 3, 4]
    assert item["rejected_labels"].tolist() == [-100, -100, 5]
    assert DPODataset(tmp_path / "dpo").prompt_length(0) == 2
    with IndexedWriter(tmp_path / "rl", "rl", V, has_answers=True) as w:
        w.add_rl([9, 8, 7], [4, 2], "42")
        w.add_rl([6], None, None)
    rl = RLDataset(tmp_path / "rl")
    assert rl[0]["prompt_ids"].tolist() == [9, 8, 7]
    assert rl[0]["answer_ids"].tolist() == [4, 2] and rl[0]["answer_text"] == "42"
    assert rl[1]["answer_text"] == "" and rl[1]["answer_ids"].tolist() == []
    with pytest.warns(UserWarning, match=r"1 of 2 samples are longer than block_size=2 and keep only their last"):
        short = RLDataset(tmp_path / "rl", block_size=2)
    assert short[0]["prompt_ids"].tolist() == [8, 7] and short.num_truncated == 1


def test_writer_is_atomic(tmp_path):
    d = _write_sft(tmp_path / "sft", [([1, 2], [0, 1])])
    with pytest.raises(RuntimeError):
        with IndexedWriter(d, "sft", V) as w:
            w.add_sft([3, 4, 5], [0, 1, 1])
            raise RuntimeError("crash while writing")
    assert SFTDataset(d)[0]["input_ids"].tolist() == [1, 2]          # the old data is intact
    assert [p.name for p in tmp_path.iterdir()] == ["sft"]           # no temporary left behind
    _write_sft(d, [([6, 7, 8], [0, 0, 1])])                          # replacing works
    assert SFTDataset(d)[0]["input_ids"].tolist() == [6, 7, 8]


def test_datasets_pickle_without_copying_the_mapping(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(10_000, dtype=np.uint16))
    ds = PretrainDataset(tmp_path / "t.npy", 100)
    ds[0]
    assert len(pickle.dumps(ds)) < 2000
    assert pickle.loads(pickle.dumps(ds))[5]["input_ids"][0].item() == 500
    sft = _write_sft(tmp_path / "sft", [(list(range(1, 300)), [1] * 299)] * 20)
    s = SFTDataset(sft)
    s[0]
    assert len(pickle.dumps(s)) < 4000


def test_file_dataset_and_concat(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(40, dtype=np.uint16))
    np.save(tmp_path / "b.npy", np.arange(100, 140, dtype=np.uint16))
    fd = FileDataset([tmp_path / "a.npy", tmp_path / "b.npy"])
    assert len(fd) == 2 and fd[1].endswith("b.npy")
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        FileDataset([tmp_path / "missing.npy"])

    class Lazy(FileDataset):  # the subclassing style: files named on demand
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return str(tmp_path / ("a.npy" if i == 0 else "b.npy"))

    for files in (fd, Lazy()):
        cat = ConcatFileDataset(files, lambda f: PretrainDataset(f, 10))
        assert len(cat) == 8
        assert cat.locate(5) == (1, 1)
        assert cat[5]["input_ids"].tolist() == list(range(110, 120))
    cat = open_dataset("pretrain", fd, 10)
    assert len(cat) == 8 and cat[-1]["input_ids"][0].item() == 130


def test_streaming_jsonl_pretrain(tmp_path):
    from tokenizers import Tokenizer as HF, models, pre_tokenizers
    from llm_trainer.tokenizer import Tokenizer

    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "a", "b", "c", "d"])}
    hf = HF(models.WordLevel(vocab, unk_token="a"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = Tokenizer.from_tokenizers(hf, eos_token="<|endoftext|>")
    with open(tmp_path / "p.jsonl", "w") as f:
        for line in ["a b", "c", "d d d", "b"]:
            f.write(json.dumps({"text": line}) + "\n")
        f.write("\n")
    ds = StreamingPretrainDataset(tmp_path / "p.jsonl", tok, block_size=3)
    # stream: a b EOS c EOS d d d EOS b EOS -> windows of 3, tail dropped
    assert [w["input_ids"].tolist() for w in ds] == [[1, 2, 0], [3, 0, 4], [4, 4, 0]]
    r0 = [w["input_ids"].tolist() for w in StreamingPretrainDataset(tmp_path / "p.jsonl", tok, 2, rank=0,
                                                                        world_size=2)]
    r1 = [w["input_ids"].tolist() for w in StreamingPretrainDataset(tmp_path / "p.jsonl", tok, 2, rank=1,
                                                                        world_size=2)]
    assert r0 == [[1, 2], [0, 4], [4, 4]] and r1 == [[3, 0], [2, 0]]   # lines 0,2 vs 1,3
    with open(tmp_path / "bad.jsonl", "w") as f:
        f.write(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": 3}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2, field 'text': expected a string, got int"):
        list(StreamingPretrainDataset(tmp_path / "bad.jsonl", tok, 2))
    with pytest.raises(DataError, match=r"p\.jsonl: a \.jsonl text file has no random access"):
        PretrainDataset(tmp_path / "p.jsonl", 2)


# ------------------------------------------------------------------------------------------------------- memory
def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")
def test_iterating_a_1gb_file_keeps_rss_flat(tmp_path):
    n = 1 << 29                                   # 512 Mi uint16 tokens = 1 GiB of data
    path = tmp_path / "big.npy"
    with open(path, "wb") as f:                   # sparse: header, then a hole up to the last token
        np.lib.format.write_array_header_1_0(f, {"descr": "<u2", "fortran_order": False, "shape": (n,)})
        f.seek(f.tell() + 2 * n - 2)
        f.write(np.array([7], "<u2").tobytes())
    assert os.path.getsize(path) > 1 << 30
    block = 1 << 20                               # windows of 1 Mi tokens (8 MiB as int64)
    before = _rss_mb()
    ds = PretrainDataset(path, block, vocab_size=8)   # every id is scanned at open: RSS stays flat there too
    assert _rss_mb() - before < 100
    assert len(ds) == n // block
    before = _rss_mb()
    peak = 0.0
    total = 0
    for i in range(len(ds)):                      # every token of the file, end to end
        x = ds[i]["input_ids"]
        total += x.numel()
        if i % 16 == 0:
            peak = max(peak, _rss_mb() - before)
    peak = max(peak, _rss_mb() - before)
    assert total == n and x[-1].item() == 7 and x.dtype == torch.long
    assert peak < 100, f"RSS grew by {peak:.0f} MB while reading a 1 GiB file"


def test_dataloader_workers_reopen_files(tmp_path):
    from torch.utils.data import DataLoader
    from llm_trainer.data import PadCollate, ShardedSampler

    recs = [(list(range(1, 2 + k)), [0] + [1] * k) for k in range(12)]
    ds = SFTDataset(_write_sft(tmp_path / "sft", recs))
    sampler = ShardedSampler(len(ds), seed=0)
    loader = DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=PadCollate(0), num_workers=2)
    seen = sorted(int(b) for batch in loader for b in batch["attention_mask"].sum(1))
    assert seen == [len(r[0]) for r in recs]
