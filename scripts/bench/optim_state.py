"""Benchmark: optimizer state memory and step time, fp32 vs bf16 moments (`OptimConfig.state_dtype`).

    python scripts/bench/optim_state.py [--hidden 384] [--layers 6] [--vocab 16384] [--steps 10] [--threads 1]

Builds an `LlmModel` (~22M parameters by default), gives every parameter a fixed random gradient and times
optimizer steps alone (median, the variants interleaved step by step): `torch.optim.AdamW` (what `build_optimizer`
returns for fp32 state), `llm_trainer.optim.AdamW` with bf16 moments, and Lion with fp32 / bf16 moments. Reports
the bytes of optimizer state and the step time relative to torch's AdamW of the same run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llm_trainer.configs import OptimConfig  # noqa: E402
from llm_trainer.model import LlmModel, ModelConfig  # noqa: E402
from llm_trainer.optim import build_optimizer  # noqa: E402


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    variants = {"AdamW fp32 (torch)": dict(), "AdamW bf16 state": dict(state_dtype="bf16"),
                "Lion fp32": dict(optim_type="lion"), "Lion bf16 state": dict(optim_type="lion", state_dtype="bf16")}
    models, opts = {}, {}
    for name, kw in variants.items():
        torch.manual_seed(0)
        model = LlmModel(ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                     num_attention_heads=6, num_key_value_heads=2))
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        models[name], opts[name] = model, build_optimizer(model, OptimConfig(initial_lr=1e-4, **kw))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for step in range(args.steps + 1):
        for name, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            if step:  # the first step allocates the state
                times[name].append(time.perf_counter() - t0)
    n = models["AdamW fp32 (torch)"].num_parameters()
    base_t = statistics.median(times["AdamW fp32 (torch)"])
    base_b = state_bytes(opts["AdamW fp32 (torch)"])
    print(f"torch {torch.__version__}, {args.threads} thread(s); {n / 1e6:.1f}M parameters (fp32), median of "
          f"{args.steps} steps")
    print(f"{'optimizer':<20} {'class':<28} {'state MB':>9} {'vs AdamW fp32':>14} {'step ms':>9} {'time ratio':>11}")
    for name, opt in opts.items():
        t, b = statistics.median(times[name]), state_bytes(opt)
        cls = f"{type(opt).__module__.split('.')[0]}.{type(opt).__name__}"
        print(f"{name:<20} {cls:<28} {b / 2**20:>9.1f} {b / base_b:>13.2f}x {t * 1000:>9.1f} {t / base_t:>10.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
