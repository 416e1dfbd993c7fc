"""Benchmark: batched KV-cache greedy generation, llm_trainer vs transformers `generate`, same weights, one run.

    python scripts/bench/generate.py [--batch 8] [--prompt-len 32] [--new-tokens 64] [--repeats 5] [--threads 1] [--ragged]

Builds a ~22M-parameter Llama (random init, fixed seed) with `transformers`, saves it in HF format, loads the same
folder with `LlmModel.from_pretrained`, and times greedy decoding of the same prompts with EOS ignored (every row
generates exactly --new-tokens tokens). Reports tokens/s (batch × new tokens / wall time, prefill included; median
of --repeats after one warm-up each), the ratio, and how many generated tokens agree between the two.
`--ragged` gives the prompts different lengths (left padding) instead of all --prompt-len.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llm_trainer.generation import GenerateConfig, generate  # noqa: E402
from llm_trainer.model import LlmModel  # noqa: E402


def build_hf_model(seed: int, arch: str, vocab: int = 16384, hidden: int = 384, intermediate: int = 1024,
                   layers: int = 6, heads: int = 6, kv_heads: int = 2, tie: bool = False):
    import transformers

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                  rms_norm_eps=1e-6, tie_word_embeddings=tie, initializer_range=0.05)
    torch.manual_seed(seed)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def timed_pair(fa, fb, repeats: int):
    """Alternate a and b (after one warm-up each) so that load changes on a shared machine hit both alike."""
    ra, rb = fa(), fb()
    ta, tb, ca, cb = [], [], [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        ra = fa()
        ta.append(time.perf_counter() - t0)
        ca.append(time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        rb = fb()
        tb.append(time.perf_counter() - t0)
        cb.append(time.process_time() - c0)
    return ta, tb, ca, cb, ra, rb


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both (default 1: on a shared machine more threads oversubscribe it)")
    ap.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    ap.add_argument("--ragged", action="store_true", help="prompts of different lengths (left padding)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--tie", action="store_true", help="tied input/output embeddings")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    hf = build_hf_model(args.seed, args.arch, args.vocab, args.hidden, args.intermediate, args.layers, args.heads,
                        args.kv_heads, args.tie)
    n_params = sum(p.numel() for p in hf.parameters())
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = LlmModel.from_pretrained(d).eval()

    g = torch.Generator().manual_seed(args.seed + 1)
    V = hf.config.vocab_size
    lengths = [args.prompt_len] * args.batch
    if args.ragged:
        lengths = [max(1, args.prompt_len - 3 * i) for i in range(args.batch)]
    prompts = [torch.randint(1, V, (n,), generator=g).tolist() for n in lengths]
    P = max(lengths)
    ids = torch.zeros((args.batch, P), dtype=torch.long)
    mask = torch.zeros((args.batch, P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1

    T = args.new_tokens
    cfg = GenerateConfig(max_new_tokens=T, do_sample=False)

    def run_ours():
        return generate(ours, prompts, cfg, eos_token_ids=[], pad_token_id=0)

    def run_hf():
        with torch.no_grad():
            return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=T, min_new_tokens=T,
                               do_sample=False, eos_token_id=None, pad_token_id=0)

    ta, tb, ca, cb, out_ours, out_hf = timed_pair(run_ours, run_hf, args.repeats)
    t_ours, t_hf = statistics.median(ta), statistics.median(tb)
    c_ours, c_hf = statistics.median(ca), statistics.median(cb)
    n_tok = args.batch * T
    ours_tps, hf_tps = n_tok / t_ours, n_tok / t_hf
    hf_new = out_hf[:, P:].tolist()
    agree = sum(a == b for r_o, r_h in zip(out_ours.completions, hf_new) for a, b in zip(r_o, r_h))
    same_rows = sum(r_o == r_h for r_o, r_h in zip(out_ours.completions, hf_new))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average {load:.1f} on {os.cpu_count()} CPUs (wall-clock ratios are unreliable when loaded)")
    print(f"model: {args.arch}, {n_params / 1e6:.1f}M params, fp32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"batch {args.batch}, prompt lengths {min(lengths)}-{P}{' (left-padded)' if args.ragged else ''}, "
          f"{T} new tokens each (EOS ignored), greedy, median of {args.repeats}")
    print(f"llm_trainer.generate : {t_ours * 1000:8.1f} ms  {ours_tps:8.1f} tokens/s   (process CPU time "
          f"{c_ours * 1000:.0f} ms)")
    print(f"transformers.generate: {t_hf * 1000:8.1f} ms  {hf_tps:8.1f} tokens/s   (process CPU time "
          f"{c_hf * 1000:.0f} ms)")
    print(f"ratio (ours / transformers): {ours_tps / hf_tps:.2f}x wall-clock  (best-of-{args.repeats} "
          f"{min(tb) / min(ta):.2f}x; per repeat {', '.join(f'{b / a:.2f}' for a, b in zip(ta, tb))}); "
          f"{c_hf / c_ours:.2f}x by CPU time")
    print(f"identical generated tokens: {agree}/{n_tok} ({same_rows}/{args.batch} rows identical)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
