"""Cost curves: peak memory and step time of SFT (full, LoRA), DPO and one GRPO iteration, ours vs trl, by model size
and sequence length, measured in the same run.

    python scripts/bench/scale.py                                  # the default grid (GRID below; hours on 2 CPUs)
    python scripts/bench/scale.py --tasks sft --sizes 20M --seqs 512 2048 --repeats 2
    python scripts/bench/scale.py --sweep --repeats 3                # CPU: SFT over seq × size, minutes a repeat
    python scripts/bench/scale.py --smoke                          # tiny model, a few seconds per run (tests)
    python scripts/bench/scale.py --report-only --plot docs/img/scale.png   # table + plot from --results
    python scripts/bench/scale.py --tasks sft_packed --sizes 125M --seqs 2048 --batch 8 --dtype bf16   # on a GPU

Model folders (random weights, Qwen2 architecture, ``common.SHAPES``: 20M, 125M, 350M, Qwen2.5-0.5B's shape) are
written once under ``--dir`` with our ``save_pretrained``; both sides load the same folder. Every measurement is a
fresh subprocess running ``vs_trl.py`` (its docstring says what each task does and what is measured), so each peak
is its own; per point the sides alternate ours, trl, trl, ours, ... over ``--repeats`` rounds. Every run is
appended to ``--results`` (JSON lines) as it finishes: an interrupted grid resumes where it stopped, and
``--report-only`` re-reads it. Per point and side the report gives the median and range over the runs of the step
time (each run's median over its timed steps), the process CPU time per step, the peak memory (CPU: ``ru_maxrss``
of the whole run; CUDA: ``max_memory_allocated``), the peak above the RSS after imports (trl imports transformers,
datasets, accelerate; ours torch and llm_trainer), and the ratios ours/trl of the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (SHAPES, WorkerError, alternate, fmt_range, machine_line, median, run_worker,  # noqa: E402
                    shape_parameters, worker_env, write_model_folder)
from vs_trl import TASKS  # noqa: E402

HERE = Path(__file__).resolve().parent

# (task, size, sequence length, gradient checkpointing), in priority order: an interrupted run has the main points
GRID = (
    [("sft", "20M", 512, True), ("sft", "20M", 2048, True)]
    + [(t, "20M", 512, True) for t in ("sft_lora", "dpo", "grpo")]
    + [(t, "125M", 512, True) for t in ("sft", "sft_lora", "dpo", "grpo")]
    + [("sft", "20M", s, True) for s in (1024, 4096, 8192)]
    + [("sft", "20M", s, False) for s in (512, 2048)]
    + [(t, "0.5B", 512, True) for t in ("sft_lora", "sft", "dpo", "grpo")]
    + [(t, "20M", 2048, True) for t in ("sft_lora", "dpo", "grpo")]
    + [("sft", "125M", 2048, True), ("sft_lora", "125M", 2048, True)]
    + [("sft_lora", "0.5B", 2048, True), ("sft", "0.5B", 2048, True), ("sft", "125M", 8192, True)]
)
SWEEP = [("sft", "20M", s, True) for s in (256, 512, 1024)] + [("sft", "125M", s, True) for s in (256, 512)]
"""``--sweep``: full SFT over sequence lengths and two model sizes, ~4 minutes a repeat on one CPU thread."""
SMOKE = [(t, "tiny", 64, g) for t, g in (("sft", True), ("dpo", False), ("grpo", False))]   # no peft needed
MIB = 1 << 20


def timed_steps(size: str, seq: int) -> int:
    """Timed steps per run: 2 where a step is cheap (≤ a 125M model × 512 tokens), else 1."""
    return 2 if shape_parameters(size) * seq <= 125e6 * 512 else 1


def point_key(r: dict) -> tuple:
    return (r["task"], r["size"], r["seq"], r["batch"], r["gc"], r["dtype"])


def load_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def schedule(points, repeats: int, records: list[dict], batch: int, dtype: str) -> list[tuple]:
    """The runs still to do, in order: per point ``repeats`` rounds, the sides alternating ours, trl | trl, ours | ...
    (a load trend then favours neither); a run already in ``records`` without an error is not repeated."""
    done: dict[tuple, int] = defaultdict(int)
    for r in records:
        if "error" not in r:                       # failed runs are measured again
            done[point_key(r) + (r["side"],)] += 1
    runs = []
    for task, size, seq, gc in points:
        for rep in range(repeats):
            for side in alternate(["ours", "trl"], rep):
                if done[(task, size, seq, batch, gc, dtype, side)] <= rep:
                    runs.append((task, size, seq, gc, rep, side))
    return runs


def measure(args, points) -> None:
    for task, size, seq, gc, rep, side in schedule(points, args.repeats, load_results(args.results), args.batch,
                                                   args.dtype):
        folder = write_model_folder(args.dir / size, size)
        steps = args.steps or timed_steps(size, seq)
        meta = dict(task=task, size=size, seq=seq, batch=args.batch, gc=gc, dtype=args.dtype, side=side)
        cmd = [sys.executable, str(HERE / "vs_trl.py"), "--side", side, "--task", task, "--model",
               str(folder), "--seq", str(seq), "--batch", str(args.batch), "--steps", str(steps),
               "--threads", str(args.threads), "--dtype", args.dtype, "--work", str(args.dir / "work")]
        t0 = time.time()
        try:
            res = run_worker(cmd + (["--gc"] if gc else []), env=worker_env(args.threads),
                             timeout=args.timeout)
        except WorkerError as e:
            res = {"error": str(e)[-1500:]}
        rec = {**meta, "repeat": rep, "wall_s": time.time() - t0, "load": os.getloadavg()[0],
               "date": time.strftime("%Y-%m-%d %H:%M"), **res}
        with open(args.results, "a") as f:
            f.write(json.dumps(rec) + "\n")
        state = f"error: {res['error'][-300:]}" if "error" in res else (
            f"step {median(res['step_s']):.2f} s, peak {peak(res) / MIB:.0f} MiB")
        print(f"{task:<10} {size:>5} {seq:>5} gc={int(gc)} {side:<4} repeat {rep}: {state} "
              f"({rec['wall_s']:.0f} s)", flush=True)
        mine = [r for r in load_results(args.results) if point_key(r) == point_key(meta)]
        row = summarize(mine)[0]
        if "cpu_ratio" in row:                     # the point's ratios so far, ours / trl (medians)
            print(f"{'':>36}ours/trl so far: CPU time {row['cpu_ratio']:.2f}×, wall {row['time_ratio']:.2f}×, "
                  f"peak {row['mem_ratio']:.2f}× ({row['ours']['runs']}+{row['trl']['runs']} runs)", flush=True)


def peak(r: dict) -> int:
    """The run's peak memory: CUDA allocator peak on a GPU, else the process's peak RSS."""
    return r["cuda_peak"] if r.get("cuda_peak") else r["peak_rss"]


def summarize(records: list[dict]) -> list[dict]:
    """One row per point: per side the runs' step times, CPU times, peaks; ratios of the medians."""
    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    errors: dict[tuple, list[str]] = defaultdict(list)
    for r in records:
        if "error" in r:
            errors[point_key(r)].append(f"{r['side']}: {r['error'].strip().splitlines()[-1][:160]}")
        else:
            groups[point_key(r)][r["side"]].append(r)
    rows = []
    for key in sorted(set(groups) | set(errors), key=lambda k: (TASKS.index(k[0]), shape_parameters(k[1]), k[2],
                                                                   not k[4])):
        row = dict(zip(("task", "size", "seq", "batch", "gc", "dtype"), key), errors=errors.get(key, []))
        for side, runs in groups.get(key, {}).items():
            row[side] = dict(runs=len(runs), step=[median(r["step_s"]) for r in runs],
                             cpu=[median(r["step_cpu_s"]) for r in runs], peak=[peak(r) for r in runs],
                             above=[r["peak_rss"] - r["import_rss"] for r in runs],
                             tokens=[r["tokens_per_step"] for r in runs if "tokens_per_step" in r])
        if "ours" in row and "trl" in row:
            o, t = row["ours"], row["trl"]
            row["time_ratio"] = median(o["step"]) / median(t["step"])
            row["cpu_ratio"] = median(o["cpu"]) / median(t["cpu"])
            row["mem_ratio"] = median(o["peak"]) / median(t["peak"])
            row["above_ratio"] = median(o["above"]) / median(t["above"])
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    """The table: per point the step's process CPU time (one thread: the compute, steady under machine load) and
    wall time, ranges over the runs, the ratios ours/trl of the medians, and the peak memory."""
    head = ("| task | model | seq | ckpt | ours CPU s/step | trl CPU s/step | **CPU time ours/trl** | wall ours/trl | "
            "ours peak MiB | trl peak MiB | **peak ours/trl** | above imports ours/trl | runs |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        o, t = r.get("ours"), r.get("trl")
        lead = f"| {r['task']} | {r['size']} | {r['seq']} | {'on' if r['gc'] else 'off'} | "
        if not (o and t):
            state = f"failed: {'; '.join(r['errors'])[:200]}" if r["errors"] else "incomplete (one side only)"
            lines.append(lead + state + " |" + " |" * 8)
            continue
        lines.append(
            lead + f"{fmt_range(o['cpu'])} | {fmt_range(t['cpu'])} | **{r['cpu_ratio']:.2f}×** | "
            f"{r['time_ratio']:.2f}× | {fmt_range([p / MIB for p in o['peak']], '.0f')} | "
            f"{fmt_range([p / MIB for p in t['peak']], '.0f')} | **{r['mem_ratio']:.2f}×** | "
            f"{r['above_ratio']:.2f}× | {o['runs']}+{t['runs']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Four panels: SFT peak memory and CPU time per step vs sequence length (ours solid, trl dashed, one colour per
    model size), and the ours/trl memory and time ratios of every point (below 1: ours uses less / is faster)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(12, 8.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    colors = dict(zip(SHAPES, ("black", "tab:blue", "tab:orange", "tab:purple", "tab:red")))
    sft = [r for r in rows if r["task"] == "sft" and "ours" in r and "trl" in r]
    for ax, field, label in ((axes[0][0], "peak", "peak memory (MiB)"), (axes[0][1], "cpu", "CPU time per step (s)")):
        for (size, gc) in sorted({(r["size"], r["gc"]) for r in sft}, key=lambda k: (shape_parameters(k[0]), k[1])):
            pts = sorted((r for r in sft if r["size"] == size and r["gc"] == gc), key=lambda r: r["seq"])
            if len(pts) < 2:
                continue
            xs = [r["seq"] for r in pts]
            scale = 1 / MIB if field == "peak" else 1.0
            for side, style in (("ours", "-o"), ("trl", "--s")):
                ys = [median(r[side][field]) * scale for r in pts]
                ax.plot(xs, ys, style, color=colors.get(size), alpha=1.0 if gc else 0.5,
                        label=f"{side} {size}{'' if gc else ' no ckpt'}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens, batch 1)")
        ax.set_ylabel(label)
        ax.set_title(f"full SFT: {label.split(' (')[0]} vs sequence length")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    both = [r for r in rows if "mem_ratio" in r]
    names = [f"{r['task']} {r['size']} {r['seq']}{'' if r['gc'] else ' nc'}" for r in both]
    for ax, field, title in ((axes[1][0], "mem_ratio", "peak memory, ours / trl"),
                             (axes[1][1], "cpu_ratio", "CPU time per step, ours / trl")):
        vals = [r[field] for r in both]
        ax.barh(range(len(vals)), vals, color=["tab:green" if v <= 1 else "tab:red" for v in vals])
        ax.axvline(1.0, color="black", lw=0.8)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.2f}×", va="center", fontsize=9)
        ax.set_yticks(range(len(vals)), names, fontsize=9 if len(vals) <= 12 else 6)
        ax.invert_yaxis()
        ax.set_xlim(0, max(vals + [1.0]) * 1.15)
        ax.set_xlabel("ours / trl, ratio of the medians (below 1: ours uses less)")
        ax.set_title(title + " (green: ours better)")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/llm_trainer_scale"), help="model folders and scratch")
    ap.add_argument("--results", type=Path, default=None, help="JSON lines of every run (default --dir/results.jsonl)")
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=None)
    ap.add_argument("--sizes", nargs="+", choices=list(SHAPES), default=None)
    ap.add_argument("--seqs", nargs="+", type=int, default=None)
    ap.add_argument("--no-gc", action="store_true", help="with --tasks/--sizes/--seqs: gradient checkpointing off")
    ap.add_argument("--smoke", action="store_true", help="tiny model, seq 64, sft + dpo + grpo, 1 repeat")
    ap.add_argument("--sweep", action="store_true", help="SFT, 20M at 256/512/1024 and 125M at 256/512 (CPU)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (default: 2 if cheap, else 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--timeout", type=float, default=7200, help="seconds per run")
    ap.add_argument("--report-only", action="store_true", help="no measuring: report --results")
    ap.add_argument("--plot", type=Path, default=None, help="write the PNG plot here")
    ap.add_argument("--json", type=Path, default=None, help="write the summary rows here")
    args = ap.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    args.results = args.results or args.dir / "results.jsonl"
    if args.smoke:
        points, args.repeats = SMOKE, 1
    elif args.sweep:
        points = SWEEP
    elif args.tasks or args.sizes or args.seqs:
        points = [(t, z, s, not args.no_gc) for t in (args.tasks or ["sft"]) for z in (args.sizes or ["20M"])
                  for s in (args.seqs or [512])]
    else:
        points = GRID
    print(machine_line() + f"; {args.threads} thread(s) per run, {args.dtype}, batch {args.batch}", flush=True)
    if not args.report_only:
        measure(args, points)
    wanted = {(t, z, s, args.batch, g, args.dtype) for t, z, s, g in points}
    records = [r for r in load_results(args.results) if args.report_only or point_key(r) in wanted]
    rows = summarize(records)
    print(markdown(rows))
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if any(r["errors"] and not ("ours" in r and "trl" in r) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
