"""The summary table of a ``gpu.sh`` run: reads the parts' JSON files from a results folder, prints one markdown
table and writes it (``summary.md``) and all the numbers (``results.json``) into ``--out``.

    python scripts/bench/gpu_report.py RESULTS_DIR [--out DIR]

Files read (each written by one part; a missing file is a part that failed, timed out or was skipped, and
``status.txt`` says which): ``a_*.json`` (``mfu.py``), ``scale/results.jsonl`` (``scale.py --dir RESULTS_DIR/scale``,
one line per finished run), ``c_generate*.json`` (``generate.py``), ``c_rollout*.json`` (``rollout.py``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import load_results, summarize  # noqa: E402

GIB = 1 << 30


def _mem(x) -> str:
    return "-" if x is None else f"{x / GIB:.2f} GiB"


def mfu_rows(d: Path) -> list[list[str]]:
    rows = []
    for f in sorted(d.glob("a_*.json")):
        r = json.loads(f.read_text())
        what = (f"(a) pretrain {r['size']} ({r['params'] / 1e6:.3g}M), seq {r['seq']} × batch {r['batch']}, "
                f"{r['dtype']}, {r['mode']}{', compiled' if r['compile'] else ''}")
        mfu = "n/a (no peak known)" if r["mfu"] is None else f"MFU **{100 * r['mfu']:.1f} %**"
        rows.append([what, f"{r['tokens_per_s']:,.0f} tok/s, {mfu}", "", "", _mem(r["peak_memory"])])
    return rows


def sft_rows(d: Path) -> list[list[str]]:
    """(b) from ``scale/results.jsonl`` (``scale.py --dir d/scale``): every finished run is there, so a part cut
    short by its time limit still reports the runs it completed."""
    rows = []
    for r in summarize(load_results(d / "scale" / "results.jsonl")):
        o, t = r.get("ours"), r.get("trl")
        what = f"(b) SFT{' with packing' if r['task'] == 'sft_packed' else ''}, {r['size']}, rows of {r['seq']}, " \
               f"batch {r['batch']}, {r['dtype']}"
        if not (o and t and o["tokens"] and t["tokens"]):
            state = "failed: " + "; ".join(r["errors"]) if r["errors"] else "incomplete: one side only"
            rows.append([what, state, "", "", ""])
            continue
        tps = {k: statistics.median(v["tokens"]) / statistics.median(v["step"]) for k, v in (("o", o), ("t", t))}
        rows.append([f"{what} ({o['runs']}+{t['runs']} runs)", f"{tps['o']:,.0f} tok/s", f"trl {tps['t']:,.0f} tok/s",
                     f"**{tps['o'] / tps['t']:.2f}×**",
                     f"{_mem(statistics.median(o['peak']))} vs trl {_mem(statistics.median(t['peak']))}"])
    return rows


def _versus(what: str, x: dict, base: dict | None) -> list[str]:
    """One (c) row: a variant's tokens/s and memory against transformers' (``base``; None when it failed)."""
    if base is None:
        return [what, f"{x['tokens_per_s']:,.0f} tok/s", "transformers: missing", "", _mem(x["peak_above_weights"])]
    return [what, f"{x['tokens_per_s']:,.0f} tok/s", f"transformers {base['tokens_per_s']:,.0f} tok/s",
            f"**{x['tokens_per_s'] / base['tokens_per_s']:.2f}×**",
            f"{_mem(x['peak_above_weights'])} vs {_mem(base['peak_above_weights'])} above weights"]


def generate_rows(d: Path) -> list[list[str]]:
    rows = []
    for f in sorted(d.glob("c_generate*.json")):
        r = json.loads(f.read_text())
        v = dict(r["variants"])
        base = v.pop("transformers.generate", None)
        rows += [_versus(f"(c) greedy generate, {r['params'] / 1e6:.3g}M, batch {r['batch']}, {r['new_tokens']} new "
                         f"tokens, {r['dtype']}: {name}", x, base) for name, x in v.items()]
    for f in sorted(d.glob("c_rollout*.json")):
        r = json.loads(f.read_text())
        v = r["variants"]
        rows += [_versus(f"(c) GRPO rollout, {r['prompts']} prompts × group {r['group']}, prompt {r['prompt_len']}, "
                         f"{r['new_tokens']} sampled: ours ({name} prefill)", v[name], v.get("hf"))
                 for name in ("shared", "repeat")]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="write summary.md and results.json here")
    args = ap.parse_args(argv)
    d = args.results
    head = ["measurement", "ours", "baseline", "ours / baseline", "peak GPU memory (CPU: peak RSS)"]
    rows = mfu_rows(d) + sft_rows(d) + generate_rows(d)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    status = (d / "status.txt").read_text() if (d / "status.txt").is_file() else ""
    device = (d / "device.txt").read_text() if (d / "device.txt").is_file() else ""
    text = device + "\n" + "\n".join(lines) + "\n\nparts:\n" + status
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.md").write_text(text)
        merged = {f.name: json.loads(f.read_text()) for f in sorted(d.glob("*.json"))}
        merged["scale_runs"] = load_results(d / "scale" / "results.jsonl")
        (args.out / "results.json").write_text(json.dumps(merged, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
