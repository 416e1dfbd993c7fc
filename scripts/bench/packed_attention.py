"""Benchmark: packed-batch attention, per-document SDPA (`DocumentLayout`, the default) vs the dense S×S mask.

    python scripts/bench/packed_attention.py [--lengths 8192 16384 32768] [--repeats 2] [--threads 1]

One row of S tokens packed with documents of random lengths (--min-doc..--max-doc tokens, fixed seed, the last 1 %
padding) through a tiny-but-wide `LlmModel` (hidden 256, 2 layers, 4 heads of 64, vocab 256): forward, a summed
cross-entropy and backward. Every (length, path) runs in a fresh subprocess so that its peak memory is its own;
paths alternate within each repeat. Prints the peak (CPU: RSS, `ru_maxrss`; `--device cuda`: allocated GPU memory,
after one warm-up step), its growth over the memory before the step ("step memory"), the step time, and the ratios
per-document / dense of the same run.
`--flex` adds PyTorch FlexAttention: on CPU without torch.compile (its eager fallback, which materialises the full
score matrix), forward only (no backward on CPU in torch 2.13), at the smallest length, for the record; on CUDA
compiled, forward and backward, at every length.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def packed_row(S: int, min_doc: int, max_doc: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    real = S - S // 100
    doc = torch.full((1, S), -1, dtype=torch.long)
    start, d = 0, 0
    while start < real:
        n = min(int(torch.randint(min_doc, max_doc + 1, (1,), generator=g)), real - start)
        doc[0, start:start + n] = d
        start, d = start + n, d + 1
    ids = torch.randint(0, 256, (1, S), generator=g)
    return ids, doc, d


def child(args) -> None:
    import torch
    import torch.nn.functional as F

    from llm_trainer.model import LlmModel, ModelConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = LlmModel(ModelConfig(vocab_size=256, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=args.length)).train().to(device)
    ids, doc, n_docs = packed_row(args.length, args.min_doc, args.max_doc, args.seed)
    ids, doc = ids.to(device), doc.to(device)
    flex = flex_attention_fn(doc, device) if args.impl == "flex" else None

    def step() -> float:
        if flex is not None and device.type == "cpu":  # FlexAttention has no backward on CPU (torch 2.13)
            with torch.no_grad():
                return float(F.cross_entropy(flex_forward(model, ids, flex)[0, :-1], ids[0, 1:], reduction="sum"))
        model.zero_grad(set_to_none=True)
        if flex is None:
            model.set_packed_attention(args.impl)
            logits = model(ids, document_ids=doc).logits
        else:
            logits = flex_forward(model, ids, flex)
        loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
        loss.backward()
        return float(loss)

    if device.type == "cuda":  # warm-up (kernels, FlexAttention's compilation), then measure a second step
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = time.perf_counter() - t0
    print(json.dumps({"peak_mb": peak / 2**20, "step_mb": (peak - base) / 2**20, "seconds": seconds,
                      "docs": n_docs, "loss": loss}))


def flex_attention_fn(doc, device):
    """FlexAttention over a document block mask (compiled on CUDA; eager on CPU, which materialises the scores)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    d = doc[0]

    def same_doc(b, h, q, k):
        return (d[q] == d[k]) & (k <= q) & ((d[k] >= 0) | (q == k))

    S = d.shape[0]
    block_mask = create_block_mask(same_doc, None, None, S, S, device=device)
    attend = torch.compile(flex_attention) if device.type == "cuda" else flex_attention
    return lambda q, k, v, enable_gqa=False: attend(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def flex_forward(model, ids, flex):
    """The model's logits with every attention call computed by `flex` (the block mask carries the documents)."""
    import warnings

    from llm_trainer.model import layers

    original = layers.F.scaled_dot_product_attention

    def flex_sdpa(q, k, v, attn_mask=None, is_causal=False, dropout_p=0.0, **kw):
        return flex(q, k, v, enable_gqa=kw.get("enable_gqa", False))

    layers.F.scaled_dot_product_attention = flex_sdpa  # this process only; restored below
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model(ids).logits  # no document_ids: a causal batch, masked by the block mask instead
    finally:
        layers.F.scaled_dot_product_attention = original


def run_child(args, length: int, impl: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--impl", impl, "--length", str(length), "--threads", str(args.threads),
           "--min-doc", str(args.min_doc), "--max-doc", str(args.max_doc), "--seed", str(args.seed), "--device",
           args.device]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-doc", type=int, default=128)
    ap.add_argument("--max-doc", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flex", action="store_true",
                    help="also FlexAttention: on CPU eager, forward only, smallest length; on CUDA compiled, all")
    ap.add_argument("--device", default="cpu", help="cpu (peak RSS) or cuda (peak allocated GPU memory)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="per_document", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, default=8192, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0

    import torch

    memory = "peak RSS MB" if args.device == "cpu" else "peak GPU MB"
    print(f"torch {torch.__version__}, {args.device}, {args.threads} thread(s), {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}; model hidden 256, 2 layers, 4 heads × 64, vocab 256, fp32, batch 1, "
          f"documents of {args.min_doc}-{args.max_doc} tokens; forward + CE + backward")
    print(f"{'S':>6} {'path':<13} {'docs':>5} {memory:>12} {'step MB':>9} {'time s':>14}")
    for S in args.lengths:
        with_flex = args.flex and (args.device != "cpu" or S == min(args.lengths))
        impls = ["dense_mask", "per_document"] + (["flex"] if with_flex else [])
        runs: dict[str, list[dict]] = {k: [] for k in impls}
        for r in range(args.repeats):
            for impl in (impls if r % 2 == 0 else impls[::-1]):
                runs[impl].append(run_child(args, S, impl))
        summary = {}
        for impl in impls:
            ok = [x for x in runs[impl] if "error" not in x]
            if not ok:
                print(f"{S:>6} {impl:<13} failed: {runs[impl][0]['error']}")
                continue
            times = [x["seconds"] for x in ok]
            summary[impl] = (max(x["step_mb"] for x in ok), statistics.median(times))
            print(f"{S:>6} {impl:<13} {ok[0]['docs']:>5} {max(x['peak_mb'] for x in ok):>12.0f} "
                  f"{summary[impl][0]:>9.0f} {min(times):>6.2f}-{max(times):<6.2f}  loss {ok[0]['loss']:.4f}")
        if "dense_mask" in summary and "per_document" in summary:
            (md, td), (mp, tp) = summary["dense_mask"], summary["per_document"]
            print(f"{S:>6} ratio per_document/dense_mask: step memory {mp / md:.3f}x, time {tp / td:.2f}x")
        if "flex" in summary and "per_document" in summary:
            (mf, tf), (mp, tp) = summary["flex"], summary["per_document"]
            print(f"{S:>6} ratio per_document/flex: step memory {mp / mf:.3f}x, time {tp / tf:.2f}x"
                  + (" (flex: forward only)" if args.device == "cpu" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
