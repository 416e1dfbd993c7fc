"""The data behind the learning tests' margins: their measurements over seeds × thread counts × CPU kernel paths.

    python tests/learning_margins.py                          # every check, every configuration
    python tests/learning_margins.py --checks dpo reward --seeds 0 1 2 --configs avx2/1 default/2

A training run is deterministic on one machine, but another CPU rounds float sums differently and the difference
grows over a few hundred updates into another trajectory (a Xeon and an EPYC of the same cloud "kind" disagree).
A configuration here is a thread count and a kernel path, emulating other CPUs on this one:
``ATEN_CPU_CAPABILITY`` = default / avx2 / avx512 picks the vectorised ATen kernels a CPU without AVX2, without
AVX-512, or with AVX-512 runs; ``mkl-compat`` sets ``MKL_CBWR=COMPATIBLE`` (another MKL GEMM code path, as another
CPU vendor gets). Each configuration runs in a fresh subprocess (the dispatch is fixed at import) and prints one
``MEASURE {json}`` line per (check, seed); the parent then prints each metric's min / max over everything, the
numbers a test's margin must stay clear of (see docs/benchmarks.md, "Learning tests' margins").
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (test module, measure function, default seeds); each measure(tmp_dir, seed) returns {metric: float}
CHECKS = {
    "grpo_arithmetic": ("test_grpo_learning", "measure", (0, 1, 2, 3, 4, 5)),
    "grpo_copy": ("test_grpo_trainer", "measure_copy_task", (0, 1, 2, 3)),
    "ppo_dense": ("test_ppo_trainer", "measure_dense_reward", (1, 2, 3, 4)),
    "dpo": ("test_dpo_trainer", "measure_synthetic_preferences", (42, 0, 1, 2, 3)),
    "reward": ("test_reward_model", "measure_toy_preference", (42, 0, 1, 2, 3)),
}
CONFIGS = {   # name -> (environment, thread count)
    "avx512/1": ({"ATEN_CPU_CAPABILITY": "avx512"}, 1),
    "avx2/1": ({"ATEN_CPU_CAPABILITY": "avx2"}, 1),
    "default/1": ({"ATEN_CPU_CAPABILITY": "default"}, 1),
    "mkl-compat/1": ({"MKL_CBWR": "COMPATIBLE"}, 1),
    "avx512/2": ({"ATEN_CPU_CAPABILITY": "avx512"}, 2),
    "avx2/2": ({"ATEN_CPU_CAPABILITY": "avx2"}, 2),
}


def with_gains(metrics: dict[str, float]) -> dict[str, float]:
    """Add ``gain`` for a before/after pair and ``X_gain`` for ``X_before``/``X_after`` (what the tests assert)."""
    out = dict(metrics)
    if "before" in metrics and "after" in metrics:
        out["gain"] = metrics["after"] - metrics["before"]
    for key in metrics:
        if key.endswith("_before") and key[:-7] + "_after" in metrics:
            out[key[:-7] + "_gain"] = metrics[key[:-7] + "_after"] - metrics[key]
    return out


def child(checks: list[str], seeds: list[int] | None, threads: int) -> None:
    import torch
    torch.set_num_threads(threads)
    sys.path.insert(0, str(HERE))
    import importlib
    cap = torch.backends.cpu.get_cpu_capability()
    with tempfile.TemporaryDirectory() as tmp:
        for name in checks:
            module_name, fn, default_seeds = CHECKS[name]
            module = importlib.import_module(module_name)
            measure = getattr(module, fn)
            if name == "grpo_arithmetic":          # the shared warm policy (seed-independent, kernel-dependent)
                torch.manual_seed(0)
                warm = module.warm_up(Path(tmp) / "warm")
                measure = (lambda m, w: lambda out, seed: m(w, out, seed))(measure, warm)
            for seed in seeds if seeds is not None else default_seeds:
                torch.manual_seed(0)                # what tests/conftest.py does before every test
                t0 = time.perf_counter()
                metrics = with_gains(measure(Path(tmp) / f"{name}-{seed}", seed))
                print("MEASURE " + json.dumps({"check": name, "seed": seed, "threads": torch.get_num_threads(),
                                               "kernels": cap, "seconds": round(time.perf_counter() - t0, 1),
                                               "metrics": metrics}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checks", nargs="+", default=list(CHECKS), choices=list(CHECKS))
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="default: each check's own list")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)   # thread count of a child run
    args = ap.parse_args()
    if args.child is not None:
        child(args.checks, args.seeds, args.child)
        return 0
    rows = []
    for config in args.configs:
        env_extra, threads = CONFIGS[config]
        env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
        env.update(env_extra, PYTHONPATH=os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")]))
        cmd = [sys.executable, __file__, "--child", str(threads), "--checks", *args.checks]
        if args.seeds is not None:
            cmd += ["--seeds", *map(str, args.seeds)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            return proc.returncode
        for line in proc.stdout.splitlines():
            if line.startswith("MEASURE "):
                row = {"config": config, **json.loads(line[len("MEASURE "):])}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{'check':<16} {'metric':<24} {'min':>8} {'max':>8}   (over {len(args.configs)} configurations × seeds)")
    for name in args.checks:
        mine = [r for r in rows if r["check"] == name]
        for key in mine[0]["metrics"] if mine else []:
            values = [r["metrics"][key] for r in mine]
            print(f"{name:<16} {key:<24} {min(values):8.3f} {max(values):8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
