"""example/agentic_grpo.py runs end to end as a user runs it (subprocess, tiny settings): task records, tokenizer,
the two warm-up phases (the first stopped by its probe callback or its step limit), GRPO with and without the
calculator, before/after report and results file."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = re.compile(r"\[(tool|no_tool) seed (\d)\] reward ([0-9.]+) -> ([0-9.]+); correct tool calls ([0-9.]+) -> "
                    r"([0-9.]+)")


def test_agentic_example(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "example" / "agentic_grpo.py"), "--out", str(out),
                           "--train-size", "40", "--test-size", "6", "--warmup-max-steps", "10", "--mix-steps", "3",
                           "--steps", "1", "--batch-size", "2", "--group-size", "2", "--seeds", "0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    found = {(m.group(1), m.group(2)): [float(x) for x in m.groups()[2:]] for m in REPORT.finditer(proc.stdout)}
    assert set(found) == {("tool", "0"), ("no_tool", "0")}, proc.stdout[-2000:]
    assert all(0.0 <= x <= 1.0 for v in found.values() for x in v)
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"warmup", "tool/0", "no_tool/0"}
    assert (out / "grpo_tool_0" / "final" / "config.json").is_file()
    assert (out / "grpo_no_tool_0" / "metrics.jsonl").read_text().count('"env/turns"') >= 1
