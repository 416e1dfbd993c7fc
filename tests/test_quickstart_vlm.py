"""The VLM quickstart (``llm-trainer quickstart --vlm``) and ``example/vlm_sft.py`` run end to end (tiny settings)."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np

from llm_trainer.cli.main import main
from llm_trainer.model import VlmModel
from llm_trainer.quickstart.vlm import COLOURS, draw_image
from llm_trainer.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_drawn_images_show_the_asked_count_and_colour():
    for count in range(1, 5):
        for colour, rgb in COLOURS.items():
            img = np.asarray(draw_image(random.Random(count), 32, count, colour))
            lit = img.sum(-1) > 0
            assert (img[lit] == rgb).all()                        # one colour, exactly
            cells = lit.reshape(4, 8, 4, 8).any(axis=(1, 3))      # one shape per 8x8 cell
            assert int(cells.sum()) == count


def test_vlm_quickstart_tiny_via_cli(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--vlm", "--size", "tiny", "--output", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["chance"] == 0.25 and res["steps"] >= 1
    for key in ("accuracy_before", "accuracy_after", "count_accuracy_after", "colour_accuracy_after"):
        assert 0.0 <= res[key] <= 1.0
    printed = capsys.readouterr().out
    assert "held-out accuracy: before" in printed
    model = VlmModel.from_pretrained(out / "sft" / "final")
    assert model.config.image_token_id == Tokenizer(out / "tokenizer").image_token_id
    records = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert all(len(r["images"]) == 1 and Path(r["images"][0]).is_file() for r in records)
    assert all(r["messages"][0]["content"].startswith("<image>\n") for r in records)
    # the eval sample generation ran with its image
    samples = [json.loads(line) for line in (out / "sft" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 1 and samples[0]["prompt"] in ("how many shapes?", "what colour?")


def test_vlm_sft_example_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")   # tiny matrices: one thread is fastest
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = tmp_path / "ex"
    proc = subprocess.run([sys.executable, str(ROOT / "example" / "vlm_sft.py"), "--out", str(out), "--n-images",
                           "24", "--epochs", "1", "--batch-size", "8", "--tokens-per-image", "4", "--freeze-llm"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"held_out"' in proc.stdout
    model = VlmModel.from_pretrained(out / "sft" / "final")
    assert model.config.tokens_per_image == 4
