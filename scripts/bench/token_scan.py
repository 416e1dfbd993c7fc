"""Cost of the open-time token-id check: the chunked scan of a flat token file against the vocabulary size.

    python scripts/bench/token_scan.py [--tokens 100000000] [--repeats 5]

Writes one ``uint16`` and one ``uint32`` file of ``--tokens`` random ids (default 100M: 200 MB and 400 MB), then times,
interleaved per repeat (so machine load hits every method alike):

- ``scan``: :func:`llm_trainer.data.formats.first_out_of_range` over a :class:`MappedArray` (what
  ``PretrainDataset(..., vocab_size=V)`` runs at open): chunks of 1 Mi ids copied out with positioned reads;
- ``mmap.max``: the baseline, ``np.load(path, mmap_mode='r').max()`` (one vectorised pass through the mapping);
- ``open``: ``PretrainDataset(path, 1024)`` without the check, to compare the check with what opening costs anyway.

The files are freshly written, so they sit in the page cache (warm-cache numbers; a cold disk adds its read time,
the same for every method). The scan's flat RSS is checked by ``tests/test_data_formats.py`` (a 1 GiB file).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from llm_trainer.data.datasets import PretrainDataset  # noqa: E402
from llm_trainer.data.formats import MappedArray, NpyWriter, first_out_of_range, open_token_array  # noqa: E402


def _write(path: str, n: int, dtype, vocab: int) -> None:
    rng = np.random.default_rng(0)
    w = NpyWriter(path, dtype)
    for start in range(0, n, 1 << 24):
        w.write(rng.integers(0, vocab, min(1 << 24, n - start), dtype=np.int64))
    w.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=100_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = {"uint16": (os.path.join(tmp, "t16.npy"), 50_000), "uint32": (os.path.join(tmp, "t32.npy"), 150_000)}
        for name, (path, vocab) in files.items():
            _write(path, args.tokens, np.dtype(name), vocab)
        methods = {
            "scan": lambda p, v: first_out_of_range(MappedArray(open_token_array(p)), v),
            "mmap.max": lambda p, v: int(np.load(p, mmap_mode="r").max()) >= v,
            "open": lambda p, v: PretrainDataset(p, 1024),
        }
        times = {(f, m): [] for f in files for m in methods}
        for _ in range(args.repeats):
            for fname, (path, vocab) in files.items():
                for mname, fn in methods.items():
                    t0 = time.perf_counter()
                    fn(path, vocab)
                    times[(fname, mname)].append(time.perf_counter() - t0)
        print(f"{args.tokens / 1e6:.0f}M tokens, {args.repeats} repeats, warm page cache; seconds min / median / max")
        for fname in files:
            base = statistics.median(times[(fname, "mmap.max")])
            for mname in methods:
                t = times[(fname, mname)]
                print(f"  {fname:6s} {mname:9s} {min(t):7.3f} {statistics.median(t):7.3f} {max(t):7.3f}   "
                      f"x{statistics.median(t) / base:5.2f} of mmap.max   "
                      f"{args.tokens / statistics.median(t) / 1e9:5.2f} G ids/s")


if __name__ == "__main__":
    main()
