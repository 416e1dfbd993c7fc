"""The summary table of a ``gpu.sh`` run: reads the parts' JSON files from a results folder, prints one markdown
table and writes it (``summary.md``) and all the numbers (``results.json``) into ``--out``.

    python scripts/bench/gpu_report.py RESULTS_DIR [--out DIR]

Files read (each written by one part; a missing file is a part that failed, timed out or was skipped, and
``status.txt`` says which): ``a_*.json`` (``mfu.py``), ``b_*.json`` (``scale.py --json``), ``c_generate*.json``
(``generate.py``), ``c_rollout*.json`` (``rollout.py``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

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
    rows = []
    for f in sorted(d.glob("b_*.json")):
        for r in json.loads(f.read_text()):
            o, t = r.get("ours"), r.get("trl")
            if not (o and t and o["tokens"] and t["tokens"]):
                rows.append([f"(b) {r['task']} {r['size']} seq {r['seq']}", "failed: " + "; ".join(r["errors"]),
                             "", "", ""])
                continue
            tps = {k: statistics.median(v["tokens"]) / statistics.median(v["step"]) for k, v in (("o", o), ("t", t))}
            rows.append([f"(b) SFT with packing, {r['size']}, rows of {r['seq']}, batch {r['batch']}, {r['dtype']} "
                         f"({o['runs']}+{t['runs']} runs)", f"{tps['o']:,.0f} tok/s", f"trl {tps['t']:,.0f} tok/s",
                         f"**{tps['o'] / tps['t']:.2f}×**",
                         f"{_mem(statistics.median(o['peak']))} vs trl {_mem(statistics.median(t['peak']))}"])
    return rows


def generate_rows(d: Path) -> list[list[str]]:
    rows = []
    for f in sorted(d.glob("c_generate*.json")):
        r = json.loads(f.read_text())
        v = r["variants"]
        base = v.get("transformers.generate")
        for name, x in v.items():
            if name == "transformers.generate":
                continue
            rows.append([f"(c) greedy generate, {r['params'] / 1e6:.3g}M, batch {r['batch']}, {r['new_tokens']} new "
                         f"tokens, {r['dtype']}: {name}", f"{x['tokens_per_s']:,.0f} tok/s",
                         f"transformers {base['tokens_per_s']:,.0f} tok/s",
                         f"**{x['tokens_per_s'] / base['tokens_per_s']:.2f}×**",
                         f"{_mem(x['peak_above_weights'])} vs {_mem(base['peak_above_weights'])} above weights"])
    for f in sorted(d.glob("c_rollout*.json")):
        r = json.loads(f.read_text())
        v = r["variants"]
        base = v["hf"]
        for name in ("shared", "repeat"):
            x = v[name]
            rows.append([f"(c) GRPO rollout, {r['prompts']} prompts × group {r['group']}, prompt {r['prompt_len']}, "
                         f"{r['new_tokens']} sampled: ours ({name} prefill)", f"{x['tokens_per_s']:,.0f} tok/s",
                         f"transformers {base['tokens_per_s']:,.0f} tok/s",
                         f"**{x['tokens_per_s'] / base['tokens_per_s']:.2f}×**",
                         f"{_mem(x['peak_above_weights'])} vs {_mem(base['peak_above_weights'])} above weights"])
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
    text = "\n".join(lines) + "\n\nparts:\n" + status
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.md").write_text(text)
        merged = {f.name: json.loads(f.read_text()) for f in sorted(d.glob("*.json"))}
        (args.out / "results.json").write_text(json.dumps(merged, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
