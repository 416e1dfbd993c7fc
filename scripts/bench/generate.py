"""Benchmark: batched KV-cache greedy generation, llm_trainer vs transformers `generate`, same weights, one run.

    python scripts/bench/generate.py [--batch 8] [--prompt-len 32] [--new-tokens 64] [--repeats 5] [--threads 1] [--ragged]
                                     [--static] [--compile] [--device cpu|cuda] [--dtype fp32|bf16]

Builds a ~22M-parameter Llama (random init, fixed seed) with `transformers`, saves it in HF format, loads the same
folder with `LlmModel.from_pretrained`, and times greedy decoding of the same prompts with EOS ignored (every row
generates exactly --new-tokens tokens). Reports tokens/s (batch × new tokens / wall time, prefill included; median
of --repeats after one warm-up each), the ratio, and how many generated tokens agree between the two.
`--ragged` gives the prompts different lengths (left padding) instead of all --prompt-len.
`--static` adds `GenerateConfig(static_cache=True)` and `--compile` adds `compile=True` (static cache stepped by
`torch.compile(mode="reduce-overhead")`: CUDA graphs on GPU), each timed in the same interleaved rounds and reported
against both `transformers` and the default path (their warm-up call includes the compilation).
"""
from __future__ import annotations

import argparse
import functools
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


def timed_rounds(fns, repeats: int, sync=lambda: None):
    """Run every function once per round (after one warm-up each), so that load changes on a shared machine hit
    all alike. Returns per function: (wall times, process CPU times, last result)."""
    results = [f() for f in fns]
    walls, cpus = [[] for _ in fns], [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            results[i] = f()
            sync()
            walls[i].append(time.perf_counter() - t0)
            cpus[i].append(time.process_time() - c0)
    return walls, cpus, results


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
    ap.add_argument("--static", action="store_true", help="also GenerateConfig(static_cache=True)")
    ap.add_argument("--compile", action="store_true", help="also GenerateConfig(compile=True)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights of both models")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    hf = build_hf_model(args.seed, args.arch, args.vocab, args.hidden, args.intermediate, args.layers, args.heads,
                        args.kv_heads, args.tie)
    n_params = sum(p.numel() for p in hf.parameters())
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = LlmModel.from_pretrained(d).eval()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    device = torch.device(args.device)
    hf, ours = hf.to(device=device, dtype=dtype), ours.to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

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
    ids, mask = ids.to(device), mask.to(device)

    T = args.new_tokens
    variants = {"llm_trainer.generate": GenerateConfig(max_new_tokens=T, do_sample=False)}
    if args.static:
        variants["  static_cache=True"] = GenerateConfig(max_new_tokens=T, do_sample=False, static_cache=True)
    if args.compile:
        variants["  compile=True"] = GenerateConfig(max_new_tokens=T, do_sample=False, compile=True)

    def run_hf():
        with torch.no_grad():
            return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=T, min_new_tokens=T,
                               do_sample=False, eos_token_id=None, pad_token_id=0)

    fns = [functools.partial(generate, ours, prompts, cfg, eos_token_ids=[], pad_token_id=0)
           for cfg in variants.values()] + [run_hf]
    walls, cpus, results = timed_rounds(fns, args.repeats, sync)
    names = list(variants) + ["transformers.generate"]
    n_tok = args.batch * T
    hf_new = results[-1][:, P:].tolist()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average {load:.1f} on {os.cpu_count()} CPUs (wall-clock ratios are unreliable when loaded)")
    print(f"model: {args.arch}, {n_params / 1e6:.1f}M params, {args.dtype}, {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"batch {args.batch}, prompt lengths {min(lengths)}-{P}{' (left-padded)' if args.ragged else ''}, "
          f"{T} new tokens each (EOS ignored), greedy, median of {args.repeats}")
    for name, wall, cpu in zip(names, walls, cpus):
        t = statistics.median(wall)
        print(f"{name:<21}: {t * 1000:8.1f} ms  {n_tok / t:8.1f} tokens/s   (process CPU time "
              f"{statistics.median(cpu) * 1000:.0f} ms)")
    t_hf = statistics.median(walls[-1])
    for i, name in enumerate(names[:-1]):
        t = statistics.median(walls[i])
        per_repeat = ", ".join(f"{b / a:.2f}" for a, b in zip(walls[i], walls[-1]))
        line = (f"ratio ({name.strip()} / transformers): {t_hf / t:.2f}x wall-clock  (best-of-{args.repeats} "
                f"{min(walls[-1]) / min(walls[i]):.2f}x; per repeat {per_repeat}); "
                f"{statistics.median(cpus[-1]) / statistics.median(cpus[i]):.2f}x by CPU time")
        if i:
            line += f"; vs default path {statistics.median(walls[0]) / t:.2f}x"
        print(line)
        out = results[i]
        agree = sum(a == b for r_o, r_h in zip(out.completions, hf_new) for a, b in zip(r_o, r_h))
        same_rows = sum(r_o == r_h for r_o, r_h in zip(out.completions, hf_new))
        print(f"  identical generated tokens: {agree}/{n_tok} ({same_rows}/{args.batch} rows identical)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
