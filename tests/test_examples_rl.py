"""example/grpo.py and example/ppo.py run end to end as a user runs them (subprocess, tiny settings): task files,
tokenizer, tokenised data, SFT warm-up, RL, before/after report, export."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
REPORT = re.compile(r"\[(before|after)\] mean reward of sampled completions \(training prompts\): ([0-9.]+); "
                    r"held-out greedy accuracy: ([0-9.]+)")


def _run(script: str, out: Path, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "example" / script), "--out", str(out), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{script} failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _check_report(stdout: str) -> None:
    found = {m.group(1): (float(m.group(2)), float(m.group(3))) for m in REPORT.finditer(stdout)}
    assert set(found) == {"before", "after"}, stdout[-2000:]
    for sampled, held_out in found.values():
        assert 0.0 <= sampled <= 1.0 and 0.0 <= held_out <= 1.0


def test_grpo_example(tmp_path):
    out = tmp_path / "grpo"
    stdout = _run("grpo.py", out, "--max-operand", "5", "--sft-steps", "5", "--steps", "2", "--batch-size", "4",
                  "--group-size", "4", "--loss-type", "dapo", "--beta", "0.04")
    _check_report(stdout)
    assert (out / "grpo" / "final" / "config.json").is_file() and (out / "grpo" / "final" / "tokenizer.json").is_file()
    assert (out / "grpo" / "metrics.jsonl").read_text().count('"reward/mean"') >= 1
    # a second run from the exported policy (--init: its tokenizer, no warm-up), GSPO
    stdout = _run("grpo.py", tmp_path / "again", "--init", str(out / "grpo" / "final"), "--max-operand", "5",
                  "--steps", "1", "--batch-size", "4", "--group-size", "4", "--gspo")
    _check_report(stdout)
    assert not (tmp_path / "again" / "sft").exists()


def test_ppo_example(tmp_path):
    out = tmp_path / "ppo"
    stdout = _run("ppo.py", out, "--max-operand", "5", "--sft-steps", "5", "--steps", "2", "--batch-size", "8",
                  "--mini-batch", "4", "--adaptive-kl", "0.5")
    _check_report(stdout)
    assert (out / "ppo" / "final" / "config.json").is_file()
    assert (out / "ppo" / "value_model" / "model.safetensors").is_file()
