"""Benchmark: RL rollout throughput and a GRPO step time breakdown, one run.

    python scripts/bench/rollout.py [--prompts 4] [--group 8] [--prompt-len 128] [--new-tokens 32] [--repeats 3]
                                    [--threads N] [--device cpu|cuda] [--skip-grpo] [--json F]

Same weights everywhere: a ~22M-parameter Llama (random init, fixed seed) built with `transformers`, saved in HF
format and loaded with `LlmModel.from_pretrained`. Sampling (temperature 1) with EOS ignored, so every sample
generates exactly --new-tokens tokens. Rollout tokens/s = prompts × group × new tokens / wall time (prefill
included; median of --repeats after a warm-up, the variants interleaved round by round; on CUDA also the GPU memory
each allocates above the weights) for

* ``shared``: ours, each prompt prefilled once and its KV cache shared by its ``group`` samples (what the trainers do);
* ``repeat``: ours, every sample's prompt in the batch (no sharing: the prompt is prefilled group times);
* ``single``: ours, one sample at a time (batch 1);
* ``hf``: `transformers` `generate(num_return_sequences=group)` (it repeats the prompts: no prefix sharing).

Then a GRPO step breakdown on the same model: a few optimizer steps of `GRPOTrainer` (one rollout per step, β > 0)
with wall time split into generate / reward / old log-probs / reference log-probs / policy update.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import timed_rounds  # noqa: E402
from generate import build_hf_model  # noqa: E402  (scripts/bench/generate.py: its ~22M Llama)

from llm_trainer.generation import GenerateConfig, generate  # noqa: E402
from llm_trainer.model import LlmModel  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-grpo", action="store_true")
    ap.add_argument("--skip-single", action="store_true", help="skip the batch-1 baseline (slow)")
    ap.add_argument("--grpo-steps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the rollout numbers here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    hf = build_hf_model(args.seed, "llama")
    tmp = tempfile.TemporaryDirectory()
    hf.save_pretrained(tmp.name)
    ours = LlmModel.from_pretrained(tmp.name).to(dev).eval()
    hf = hf.to(dev)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 16384, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
    G, T = args.group, args.new_tokens
    cfg = GenerateConfig(max_new_tokens=T, temperature=1.0)
    n_tok = len(prompts) * G * T
    gen = torch.Generator(device=dev).manual_seed(0)

    def shared():
        return generate(ours, prompts, cfg, eos_token_ids=[], pad_token_id=0, group_size=G, generator=gen)

    def repeat():
        return generate(ours, [p for p in prompts for _ in range(G)], cfg, eos_token_ids=[], pad_token_id=0,
                        generator=gen)

    def single():
        for p in prompts:
            for _ in range(G):
                generate(ours, [p], cfg, eos_token_ids=[], pad_token_id=0, generator=gen)

    ids = torch.tensor(prompts, device=dev)

    def hf_gen():
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=T,
                               min_new_tokens=T, num_return_sequences=G, top_k=0, top_p=1.0, temperature=1.0)

    print(f"device {dev}, threads {torch.get_num_threads()}, {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M "
          f"params, {len(prompts)} prompts x group {G}, prompt {args.prompt_len} tokens, {T} new tokens")
    variants = {"shared": shared, "repeat": repeat, "hf": hf_gen}
    if not args.skip_single:
        variants["single"] = single
    walls, _, _, peaks = timed_rounds(list(variants.values()), args.repeats, sync)  # interleaved rounds
    times = {k: statistics.median(w) for k, w in zip(variants, walls)}
    for k, w, p in zip(variants, walls, peaks):
        mem = f", peak GPU memory {p / 2**20:.0f} MiB" if p is not None else ""
        print(f"  {k:7s} {n_tok / times[k]:10.1f} tok/s  ({times[k] * 1000:.0f} ms, range {min(w) * 1000:.0f}-"
              f"{max(w) * 1000:.0f})  shared is {times[k] / times['shared']:.2f}x faster{mem}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(dev), "prompts": len(prompts), "group": G, "prompt_len": args.prompt_len,
                       "new_tokens": T, "variants": {k: {"tokens_per_s": n_tok / times[k], "wall_s": w,
                                                         "peak_above_weights": p}
                                                     for k, w, p in zip(variants, walls, peaks)}}, f, indent=1)

    if not args.skip_grpo:
        grpo_breakdown(tmp.name, prompts, G, T, args)
    tmp.cleanup()
    return 0


def grpo_breakdown(model_dir, prompts, G, T, args) -> None:
    from llm_trainer.configs import GRPOConfig, OptimConfig, TrainConfig
    from llm_trainer.trainers.grpo import GRPOTrainer
    items = [{"prompt_ids": torch.tensor(p)} for p in prompts] * (args.grpo_steps + 1)

    def reward(completion_ids):
        return [float(sum(c) % 7) for c in completion_ids]

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(init_weights_path=model_dir, file_dataset=items, batch_size=len(prompts), output_dir=out,
                          optim_config=OptimConfig(initial_lr=1e-5), save_interval=None, eval_interval=None,
                          log_interval=10**6, max_steps=args.grpo_steps, dtype="auto",
                          data_loader_config={"shuffle": False},
                          grpo_config=GRPOConfig(group_size=G, loss_beta=0.04, grpo_batch_size=G,
                                                 gradient_accumulation_steps=len(prompts),
                                                 generate_config=GenerateConfig(max_new_tokens=T, temperature=1.0,
                                                                                stop_token_ids=None)))
        tr = GRPOTrainer(train_config=cfg, reward_func=reward)
        tr.engine.eos_token_ids = []                     # fixed-length completions, as above
        totals: dict[str, float] = {}
        update = 0.0
        orig = tr.train_step

        def timed(window):
            nonlocal update
            t0 = time.perf_counter()
            out_ = orig(window)
            if tr.device.type == "cuda":
                torch.cuda.synchronize()
            update += time.perf_counter() - t0
            for k, v in tr.rollout_stats.items():       # the rollout these windows come from (one per step here)
                if k.startswith("time/"):
                    totals[k[5:]] = totals.get(k[5:], 0.0) + v
            return out_
        tr.train_step = timed
        t0 = time.perf_counter()
        tr.train()
        wall = time.perf_counter() - t0
        totals["policy update"] = update
        steps = args.grpo_steps
        print(f"GRPO step ({len(prompts)} prompts x {G}, {T} new tokens, beta 0.04), mean over {steps} steps: "
              f"{wall / steps * 1000:.0f} ms")
        for k in ("generate", "reward", "old_logp", "reference", "policy update"):
            v = totals.get(k, 0.0) / steps
            print(f"  {k:14s} {v * 1000:8.0f} ms  {100 * v / (wall / steps):5.1f}%")


if __name__ == "__main__":
    sys.exit(main())
