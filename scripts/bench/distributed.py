"""Distributed benchmark on CPU: 2-rank DDP and DeepSpeed ZeRO-1/2/3 vs one process on the same global batch.

    DS_ACCELERATOR=cpu python scripts/bench/distributed.py [--steps 6] [--hidden 256] [--layers 4] [--json out]

Reports per configuration: median optimizer-step time (forward+backward of the whole accumulation window +
step) and, per rank, the bytes of tensors the run holds at the peak of a step (after the last backward of a
window, before the optimizer update), split into parameters, gradients, optimizer state (incl. master/partition
copies) and other engine buffers. Tensors are found by walking the module, the optimizer(s) and the DeepSpeed
optimizer wrapper's attributes and are de-duplicated by storage, so ZeRO's partitioning shows directly.
Ratios are against the 1-process baseline of the same run (CPU timings on a shared machine are noisy; the
memory numbers are exact).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import ROOT, max_rss_bytes  # noqa: E402

CONFIGS = ["ddp", "zero1", "zero2", "zero3"]


class BenchLM(torch.nn.Module):
    """Embedding -> residual MLP blocks -> norm -> head (a transformer's parameter mix without attention)."""

    def __init__(self, vocab: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, 4 * hidden), torch.nn.GELU(),
                                torch.nn.Linear(4 * hidden, hidden)) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(hidden)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h))


def batch(step: int, micro: int, rank: int, args) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    ids = torch.randint(0, args.vocab, (args.micro, args.seq + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


# -- memory accounting --------------------------------------------------------------------------------------------
def _tensors(obj, depth=0, seen=None):
    """Yield (path, tensor) for tensors reachable through attributes/lists/dicts (bounded depth)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 3:
        return
    seen.add(id(obj))
    if torch.is_tensor(obj):
        yield "", obj
        return
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)) and depth < 2:
        items = vars(obj).items()
    else:
        return
    for key, value in items:
        for path, t in _tensors(value, depth + 1, seen):
            yield f"{key}.{path}" if path else str(key), t


def held_bytes(module: torch.nn.Module, optimizers: list, engine_opt=None) -> dict[str, int]:
    counted: set[int] = set()
    out = {"params": 0, "grads": 0, "optim_state": 0, "other": 0}

    def add(cat: str, t: torch.Tensor | None) -> None:
        if t is None or not torch.is_tensor(t) or t.numel() == 0:
            return
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in counted or st.nbytes() == 0:
            return
        counted.add(key)
        out[cat] += st.nbytes()

    for p in module.parameters():
        add("params", getattr(p, "ds_tensor", None))  # ZeRO-3: the local shard
        add("params", p.data)
        add("grads", p.grad)
    for opt in optimizers:
        for state in opt.state.values():
            for v in state.values():
                add("optim_state", v)
        for group in opt.param_groups:  # ZeRO: flat fp32 partitions (master copies) and their grads
            for p in group["params"]:
                add("grads", p.grad)
                add("optim_state", p)
    if engine_opt is not None:
        for path, t in _tensors(engine_opt):
            add("grads" if "grad" in path.lower() else "other", t)
    out["total"] = sum(out.values())
    return out


# -- one configuration --------------------------------------------------------------------------------------------
def run_config(name: str, args, backend=None) -> dict:
    from llm_trainer.parallel import DsConfig, DsZero1Config, DsZero2Config, DsZero3Config, get_backend

    if name == "single":
        backend = get_backend(None, "fp32", kind="single", device="cpu")
    elif name == "ddp":
        backend = get_backend(None, "fp32", kind="ddp")
    else:
        small = dict(reduce_bucket_size=args.bucket, allgather_bucket_size=args.bucket)
        zero = {"zero1": DsZero1Config(**small), "zero2": DsZero2Config(**small),
                "zero3": DsZero3Config(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=args.bucket,
                                       sub_group_size=args.bucket, **small)}[name]
        backend = get_backend(DsConfig(zero_config=zero, gradient_clipping=1.0, steps_per_print=10**9), "fp32",
                              kind="deepspeed")
    world = backend.world_size
    grad_accum = args.grad_accum * (2 if name == "single" else 1)  # same global batch as 2 ranks
    torch.manual_seed(0)
    with backend.model_init_context():
        model = BenchLM(args.vocab, args.hidden, args.layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    wrapped = backend.wrap(model, opt, micro_batch_size=args.micro, grad_accum=grad_accum, grad_clip=1.0)
    times, mem = [], None
    for step in range(args.steps):
        backend.barrier()
        t0 = time.perf_counter()
        for m in range(grad_accum):
            ids, labels = batch(step, m, backend.rank, args)
            ctx = backend.no_sync() if m < grad_accum - 1 else _null()
            with ctx:
                logits = wrapped(ids)
                loss = F.cross_entropy(logits.reshape(-1, args.vocab).float(), labels.reshape(-1),
                                       reduction="sum") / (labels.numel() * grad_accum * world)
                backend.backward(loss)
        if step == args.steps - 1:
            engine_opt = getattr(getattr(backend, "engine", None), "optimizer", None)
            basic = getattr(getattr(backend, "engine", None), "basic_optimizer", None)
            mem = held_bytes(backend.unwrap(), [o for o in {id(x): x for x in (opt, basic) if x}.values()],
                             engine_opt)
        backend.clip(1.0)
        backend.step()
        backend.zero_grad()
        backend.barrier()
        times.append(time.perf_counter() - t0)
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in backend.unwrap().parameters())
    res = {"name": name, "world_size": world, "rank": backend.rank, "step_s": statistics.median(times[1:]),
           "mem": mem, "params": n_params, "maxrss_mb": max_rss_bytes() / 2**20}
    gathered = backend.all_gather_object(res)
    return {"name": name, "world_size": world, "step_s": max(r["step_s"] for r in gathered),
            "params": n_params, "per_rank": [r["mem"] for r in gathered],
            "maxrss_mb": [round(r["maxrss_mb"]) for r in gathered]}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def worker(args) -> None:
    results = [run_config(name, args) for name in args.configs]
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.worker_out, "w") as f:
            json.dump(results, f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2, help="per rank; the 1-process baseline does twice as many")
    p.add_argument("--bucket", type=int, default=2_000_000, help="ZeRO bucket sizes (elements)")
    p.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    p.add_argument("--baseline-threads", type=int, default=1,
                   help="torch threads of the 1-process baseline (each of the 2 ranks runs 1 thread; more than 1 "
                        "thread collapses on an oversubscribed machine: 15 s vs 2 s per step measured at load 7)")
    p.add_argument("--baseline-only", action="store_true", help="time the 1-process baseline only")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_out:
        worker(args)
        return

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/llm_trainer/torch_extensions"))
    torch.set_num_threads(args.baseline_threads)
    base = run_config("single", args)
    if args.baseline_only:
        print(f"1 process, {args.baseline_threads} threads: {base['step_s']:.3f} s/step")
        return
    out = os.path.join("/tmp", f"bench_distributed_{os.getpid()}.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", os.path.abspath(__file__),
           "--worker-out", out, *sys.argv[1:]]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(cmd, check=True, env=env)
    with open(out) as f:
        results = [base] + json.load(f)
    os.remove(out)

    mb = 1 / 2**20
    b_total = base["per_rank"][0]["total"]
    print(f"\nmodel: {base['params'] / 1e6:.2f}M params fp32, AdamW; global batch = {2 * args.grad_accum} x "
          f"{args.micro} x {args.seq} tokens; {args.steps} steps (median of the last {args.steps - 1})\n")
    head = (f"{'config':<8} {'ranks':>5} {'step s':>8} {'speed':>6} | {'params':>8} {'grads':>8} {'optim':>8} "
            f"{'other':>8} {'total MB':>9} {'vs 1p':>6} | {'maxRSS MB':>10}")
    print(head)
    print("-" * len(head))
    for r in results:
        m = max(r["per_rank"], key=lambda x: x["total"])  # the fullest rank
        print(f"{r['name']:<8} {r['world_size']:>5} {r['step_s']:>8.3f} {base['step_s'] / r['step_s']:>5.2f}x | "
              f"{m['params'] * mb:>8.1f} {m['grads'] * mb:>8.1f} {m['optim_state'] * mb:>8.1f} "
              f"{m['other'] * mb:>8.1f} {m['total'] * mb:>9.1f} {m['total'] / b_total:>5.2f}x | "
              f"{'/'.join(str(x) for x in r['maxrss_mb']):>10}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
