"""example/classify.py runs end to end as a user runs it (subprocess, tiny settings): task files, tokenizer, prepared
data, before/after held-out report, confusion matrix, a transformers-format export that loads back."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = re.compile(r"\[(before|after)\] held-out accuracy ([0-9.]+), macro-F1 ([0-9.]+)")


def test_classify_example(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "example" / "classify.py"), "--out", str(tmp_path), "--steps",
                           "3", "--batch-size", "8", "--max-operand", "5", "--hidden", "32", "--trainable",
                           "last_blocks"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = {m.group(1): (float(m.group(2)), float(m.group(3))) for m in REPORT.finditer(proc.stdout)}
    assert set(found) == {"before", "after"} and all(0 <= v <= 1 for pair in found.values() for v in pair)
    assert "exported classifier: 3+4=7 -> " in proc.stdout
    final = tmp_path / "run" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]       # ModelConfig's default family
    assert config["id2label"] == {"0": "false", "1": "true"} and (final / "tokenizer.json").is_file()
    assert (tmp_path / "run" / "confusion_matrix.png").is_file()
