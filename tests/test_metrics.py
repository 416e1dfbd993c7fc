import io
import json
import math

import pytest
import torch

from llm_trainer.metrics import (MetricsLogger, ProgressBar, estimate_mfu, format_duration, peak_memory_bytes,
                                 read_metrics)


def test_jsonl_records(tmp_path):
    stream = io.StringIO()
    with MetricsLogger(tmp_path, total_steps=10, stream=stream, is_tty=False) as log:
        log.log({"loss": torch.tensor(2.5), "lr": 1e-3, "grad_norm": 0.7, "tokens_per_s": 1234.0,
                 "skip_me": None}, step=1, epoch=0)
        log.log({"loss": float("nan"), "eval_loss": 2.0}, step=2, epoch=0)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["step"] == 1 and first["epoch"] == 0 and first["loss"] == 2.5 and first["lr"] == 1e-3
    assert "skip_me" not in first and isinstance(first["time"], float)
    assert math.isnan(json.loads(lines[1])["loss"])
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2]


def test_not_main_is_noop(tmp_path):
    log = MetricsLogger(tmp_path / "x", is_main=False)
    assert log.log({"loss": 1.0}, step=1) is None
    log.print("hello")
    log.close()
    assert not (tmp_path / "x").exists()


def test_resume_marker_drops_repeated_steps(tmp_path):
    with MetricsLogger(tmp_path, console=False) as log:
        for s in range(1, 8):
            log.log({"loss": 10.0 - s}, step=s)
    with MetricsLogger(tmp_path, console=False, resume_step=4) as log:  # checkpoint at 4, killed at 7
        for s in range(5, 7):
            log.log({"loss": 100.0 + s}, step=s)
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in recs] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0), (5, 105.0),
                                                      (6, 106.0)]


def test_read_metrics_skips_truncated_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    assert read_metrics(p) == [{"step": 1, "loss": 1.0}]


def test_progress_bar_non_tty_lines():
    s = io.StringIO()
    bar = ProgressBar(100, stream=s, is_tty=False)
    bar.update(10, {"loss": 1.23456, "lr": 3e-4, "tokens_per_s": 12345.0})
    bar.update(20, {"loss": 1.1})
    out = s.getvalue().splitlines()
    assert len(out) == 2 and "\r" not in s.getvalue()
    assert out[0].startswith("step 10/100") and "loss 1.2346" in out[0] and "lr 3.00e-04" in out[0]
    assert "tok/s 12.3k" in out[0] and "ETA" in out[0]


def test_progress_bar_tty_redraws_and_throttles():
    s = io.StringIO()
    bar = ProgressBar(4, stream=s, is_tty=True, min_interval=3600)
    bar.update(1, {"loss": 1.0})
    bar.update(2, {"loss": 1.0})  # throttled
    bar.write("eval: ok")
    bar.update(4, {"loss": 0.5})  # last step always drawn, then newline
    text = s.getvalue()
    assert text.count("step ") == 2 and "\r" in text and "█" in text
    assert "eval: ok\n" in text and text.endswith("\n")


def test_progress_bar_unknown_total():
    s = io.StringIO()
    ProgressBar(None, stream=s, is_tty=False).update(7, {"loss": 2.0})
    assert s.getvalue().startswith("step 7 |") and "ETA" not in s.getvalue()


def test_estimate_mfu_and_helpers():
    assert estimate_mfu(6e9, 1000.0, 312e12) == pytest.approx(6e12 / 312e12)
    assert estimate_mfu(6e9, 1000.0, None) is None
    assert format_duration(3725) == "1:02:05" and format_duration(65) == "01:05"
    mem = peak_memory_bytes("cpu")
    assert mem is None or mem > 0
