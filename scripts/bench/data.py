"""Data-loading benchmark: memory-mapped token file → ready B×T int64 batches, vs a plain in-memory numpy baseline.

    python scripts/bench/data.py [--tokens 268435456] [--block 1024] [--batch 16] [--batches 3000]

Writes a random uint16 token file (``--tokens`` tokens; default 256 Mi = 512 MiB), then, each in a fresh subprocess so
that peak RSS is measured per method:

- ``mmap``:   ``PretrainDataset`` (memory-mapped, pages released as read) + ``ShardedSampler`` (shuffled) →
              ``torch.stack`` of the windows → ``[B, T]`` int64;
- ``mmap+collate``: the same through ``PadCollate`` (``input_ids``, ``labels``, ``attention_mask``), what a trainer
              actually gets;
- ``memory``: the whole file read into a numpy array first (``np.fromfile``), the same shuffled windows sliced and
              converted to a ``[B, T]`` int64 tensor — the simplest in-RAM loader (the baseline);
- ``np.memmap``: for reference, the same slicing on a bare ``np.load(mmap_mode='r')`` array (what nanoGPT-style
              loaders do): fast once pages are mapped, but every page touched stays in the RSS.

All three read the same windows in the same order. Reported: tokens/s, peak RSS (``ru_maxrss``), RSS growth over the
process's start, and the mmap/memory ratios. The file is freshly written, so it sits in the page cache for every
method (a warm-cache comparison; a cold disk would slow the first pass of every method alike).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit_result, max_rss_bytes, rss_bytes, run_worker  # noqa: E402


def _rss_mb() -> float:
    return rss_bytes() / 2**20


def _peak_mb() -> float:
    return max_rss_bytes() / 2**20


def write_file(path: str, n: int, vocab: int, seed: int = 0) -> None:
    from llm_trainer.data.formats import NpyWriter
    rng = np.random.default_rng(seed)
    w = NpyWriter(path, np.uint16)
    chunk = 1 << 24
    for s in range(0, n, chunk):
        w.write(rng.integers(0, vocab, min(chunk, n - s), dtype=np.uint16))
    w.close()


def run_one(mode: str, path: str, block: int, batch: int, batches: int, seed: int) -> dict:
    import torch
    from llm_trainer.data import PadCollate, PretrainDataset, ShardedSampler

    torch.set_num_threads(1)
    start_rss = _rss_mb()
    t_load = time.perf_counter()
    if mode == "np.memmap":
        tokens = np.load(path, mmap_mode="r")
        n_windows = (len(tokens) - block) // block + 1
    elif mode == "memory":
        from llm_trainer.data.formats import read_npy_header
        shape, _, dtype, offset = read_npy_header(path)
        tokens = np.fromfile(path, dtype=dtype, count=shape[0], offset=offset)
        n_windows = (len(tokens) - block) // block + 1
    else:
        ds = PretrainDataset(path, block)
        n_windows = len(ds)
        collate = PadCollate(0) if mode == "mmap+collate" else None
    load_s = time.perf_counter() - t_load
    sampler = ShardedSampler(n_windows, seed=seed)
    order = iter(sampler)
    t0 = time.perf_counter()
    got = 0
    for _ in range(batches):
        idx = [next(order) for _ in range(batch)]
        if mode in ("memory", "np.memmap"):
            x = torch.from_numpy(np.stack([tokens[i * block:(i + 1) * block] for i in idx]).astype(np.int64))
        elif collate is None:
            x = torch.stack([ds[i]["input_ids"] for i in idx])
        else:
            x = collate([ds[i] for i in idx])["input_ids"]
        assert x.shape == (batch, block) and x.dtype == torch.long
        got += x.numel()
    dt = time.perf_counter() - t0
    return {"mode": mode, "tokens_per_s": got / dt, "seconds": dt, "load_seconds": load_s, "tokens": got,
            "peak_rss_mb": _peak_mb(), "rss_growth_mb": _rss_mb() - start_rss, "start_rss_mb": start_rss}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=1 << 28)
    p.add_argument("--vocab", type=int, default=50_000)
    p.add_argument("--block", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", default=None, help="where to write the token file (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--_child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        emit_result(run_one(args._child[0], args._child[1], args.block, args.batch, args.batches, args.seed))
        return 0

    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = os.path.join(d, "tokens.npy")
        t = time.perf_counter()
        write_file(path, args.tokens, args.vocab, args.seed)
        size = os.path.getsize(path)
        print(f"token file: {args.tokens:,} uint16 tokens ({size / 2**20:,.0f} MiB), written in "
              f"{time.perf_counter() - t:.1f}s; B={args.batch} T={args.block}, {args.batches} batches "
              f"({args.batch * args.block * args.batches:,} tokens) per method, shuffled windows")
        results = {}
        for mode in ("mmap", "mmap+collate", "memory", "np.memmap"):
            cmd = [sys.executable, os.path.abspath(__file__), "--_child", mode, path, "--block", str(args.block),
                   "--batch", str(args.batch), "--batches", str(args.batches), "--seed", str(args.seed)]
            results[mode] = r = run_worker(cmd, env=dict(os.environ))     # the default malloc, as a user has
            print(f"  {mode:13s} {r['tokens_per_s'] / 1e6:8.1f} M tokens/s   peak RSS {r['peak_rss_mb']:7.0f} MB   "
                  f"RSS growth {r['rss_growth_mb']:7.0f} MB   (setup {r['load_seconds']:.2f}s)")
    m, c, b = results["mmap"], results["mmap+collate"], results["memory"]
    r = results["np.memmap"]
    print(f"ratio mmap / memory: throughput {m['tokens_per_s'] / b['tokens_per_s']:.2f}x, "
          f"peak RSS {m['peak_rss_mb'] / b['peak_rss_mb']:.2f}x; "
          f"mmap+collate / memory throughput {c['tokens_per_s'] / b['tokens_per_s']:.2f}x; "
          f"np.memmap / memory throughput {r['tokens_per_s'] / b['tokens_per_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "results": results},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
