"""Peak memory and time of chunked vs plain cross-entropy (forward + backward) at a 32k vocabulary.

    python scripts/bench/chunked_ce.py                      # B=4 T=512 H=256 V=32768, float32, CPU or CUDA
    python scripts/bench/chunked_ce.py --ignore-frac 0.5    # half the positions are prompt/padding (SFT-like)

Memory is measured honestly per device:
* CUDA: ``torch.cuda.max_memory_allocated`` above the allocation level after the inputs are built.
* CPU: every variant runs in its own fresh subprocess and reports the growth of the process's peak resident set
  (``VmHWM`` in ``/proc/self/status``) from just before the loss to after ``backward``. Large tensors are
  ``mmap``-ed and returned to the OS on free, so the high-water mark sees the real peak of live tensor memory
  (plus small allocator slack). The libraries are warmed up on a tiny problem first so one-time buffers are
  not counted.
Workers run with ``MALLOC_MMAP_THRESHOLD_=131072`` so glibc's dynamic threshold cannot keep freed chunks
in the heap. Both numbers include the gradients of ``hidden`` and ``lm_head_weight`` (identical for both variants).
Time is the median wall time of ``--repeats`` forward+backward passes after the memory run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (WorkerError, emit_result, hwm_bytes, now, reset_hwm, rss_bytes, run_worker,  # noqa: E402
                    worker_env)


def _make_inputs(args, device, dtype):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = (torch.randn(args.B, args.T, args.H, generator=g) * 0.5).to(device, dtype).requires_grad_(True)
    w = (torch.randn(args.V, args.H, generator=g) * args.H**-0.5).to(device, dtype).requires_grad_(True)
    labels = torch.randint(0, args.V, (args.B, args.T), generator=g)
    if args.ignore_frac > 0:
        n_ign = int(args.ignore_frac * args.T)
        labels[:, :n_ign] = -100  # prompt-style prefix
    return hidden, w, labels.to(device)


def _step(variant, hidden, w, labels):
    import torch.nn.functional as F

    from llm_trainer.losses import chunked_lm_loss, lm_loss

    hidden.grad = None
    w.grad = None
    if variant == "plain":
        s, n = lm_loss(F.linear(hidden, w), labels)
    else:
        s, n = chunked_lm_loss(hidden, w, labels, chunk_size=int(variant.split(":")[1]))
    loss = s / n.clamp(min=1)
    loss.backward()
    return loss.item()


def worker(args) -> dict:
    import torch

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    # warm-up on a tiny problem (library buffers, lazy init) so it is not counted
    small = argparse.Namespace(**{**vars(args), "B": 1, "T": 8, "V": 64})
    h, w, y = _make_inputs(small, device, dtype)
    _step(args.variant, h, w, y)
    hidden, w, labels = _make_inputs(args, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = _step(args.variant, hidden, w, labels)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = hwm_bytes() if reset_hwm() else rss_bytes()  # cannot reset: the current RSS is the baseline
        loss = _step(args.variant, hidden, w, labels)
        peak = hwm_bytes() - base
    times = []
    for _ in range(args.repeats):
        t0 = now()
        _step(args.variant, hidden, w, labels)
        times.append(now() - t0)
    grad_norm = float(w.grad.float().norm())
    return {"variant": args.variant, "peak_bytes": int(peak), "time_s": statistics.median(times), "loss": loss,
            "grad_w_norm": grad_norm}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--H", type=int, default=256)
    p.add_argument("--V", type=int, default=32768)
    p.add_argument("--chunk-sizes", default="256,1024,4096")
    p.add_argument("--ignore-frac", type=float, default=0.0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.variant:
        emit_result(worker(args))
        return 0
    variants = ["plain"] + [f"chunked:{c}" for c in args.chunk_sizes.split(",") if c]
    n_valid = args.B * (args.T - 1 - int(args.ignore_frac * args.T)) if args.ignore_frac else args.B * (args.T - 1)
    print(f"B={args.B} T={args.T} H={args.H} V={args.V} dtype={args.dtype} device={args.device} "
          f"valid tokens={n_valid}; full fp32 logits would be {args.B * args.T * args.V * 4 / 2**20:.0f} MiB")
    results = []
    for v in variants:
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", v] + [
            a for k, val in vars(args).items() if k != "variant" and val is not None
            for a in (f"--{k.replace('_', '-')}", str(val))]
        try:  # worker_env: a static glibc mmap threshold, so freed memory leaves the RSS and VmHWM is the peak
            results.append(run_worker(cmd, env=worker_env()))
        except WorkerError as e:
            print(e, file=sys.stderr)
            return 1
    base = results[0]
    print(f"{'variant':<14}{'peak MiB':>10}{'mem ratio':>11}{'time s':>9}{'time ratio':>12}{'loss':>10}")
    for r in results:
        print(f"{r['variant']:<14}{r['peak_bytes'] / 2**20:>10.1f}{r['peak_bytes'] / base['peak_bytes']:>11.3f}"
              f"{r['time_s']:>9.3f}{r['time_s'] / base['time_s']:>12.2f}{r['loss']:>10.5f}")
    for r in results[1:]:
        assert abs(r["loss"] - base["loss"]) < 1e-3 * max(1.0, abs(base["loss"])), (r, base)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
