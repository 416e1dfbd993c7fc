import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from llm_trainer.cli import calc_intermediate_size as cis
from llm_trainer.cli.vis import ema, vis_log, vis_lr
from llm_trainer.configs import OptimConfig, TrainConfig
from llm_trainer.metrics import MetricsLogger
from llm_trainer.scheduler import schedule_preview

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


def assert_png(path):
    path = Path(path)
    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == PNG_MAGIC


def write_run(d, n=30, scale=1.0, eval_every=10):
    cfg = OptimConfig(initial_lr=1e-4, max_lr=1e-3, warmup_iters=5, enable_lr_scheduler=True,
                      cosine_annealing_period=20)
    lrs = schedule_preview(cfg, n)
    with MetricsLogger(d, console=False) as log:
        for s in range(1, n + 1):
            m = {"loss": scale * (3 + math.sin(s)) / s ** 0.3, "aux_loss": 0.01, "lr": lrs[s - 1],
                 "grad_norm": 1.0 / s, "tokens_per_s": 1000.0 + s}
            if s % eval_every == 0:
                m["eval_loss"] = scale * 2.0 / s ** 0.2
            log.log(m, step=s, epoch=0)
    return Path(d) / "metrics.jsonl"


def test_ema_bias_corrected():
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    out = ema([1.0, float("nan"), 3.0], 0.5)
    assert out[0] == 1.0 and out[1] == 1.0 and out[2] == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)


def test_vis_log_single_png(tmp_path, capsys):
    f = write_run(tmp_path / "run_a")
    assert vis_log([str(f)]) == 0
    assert_png(tmp_path / "run_a" / "metrics.png")
    assert str(tmp_path / "run_a" / "metrics.png") in capsys.readouterr().out


def test_vis_log_runs_overlaid_per_key_dir(tmp_path):
    a = write_run(tmp_path / "a")
    b = write_run(tmp_path / "b", scale=1.3)
    out = tmp_path / "plots"
    assert vis_log([str(a), str(tmp_path / "b"), "--keys", "loss", "lr", "eval_loss", "--ema", "0.8",
                    "--out", str(out)]) == 0
    for key in ("loss", "lr", "eval_loss"):
        assert_png(out / f"{key}.png")
    assert b.exists()


def test_vis_log_errors(tmp_path, capsys):
    f = write_run(tmp_path / "r")
    assert vis_log([str(tmp_path / "missing.jsonl")]) == 1
    assert vis_log([str(f), "--keys", "nope"]) == 1
    assert "available" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert vis_log([str(empty)]) == 1
    with pytest.raises(SystemExit) as e:
        vis_log([str(f), "--ema", "1.5"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        vis_log([])
    assert e.value.code == 2


def test_vis_lr_from_toml_config(tmp_path, capsys):
    cfg = TrainConfig(optim_config=OptimConfig(initial_lr=1e-5, max_lr=1e-3, min_lr=1e-5, warmup_iters=10,
                                               enable_lr_scheduler=True, cosine_annealing_period=50,
                                               cosine_annealing_period_mul=2))
    cfg.save(tmp_path / "train.toml")
    out = tmp_path / "lr.png"
    assert vis_lr([str(tmp_path / "train.toml"), "--steps", "200", "--out", str(out)]) == 0
    assert_png(out)
    text = capsys.readouterr().out
    assert "peak = 1.000e-03 (step 10)" in text


def test_vis_lr_from_flat_json_and_optim_table(tmp_path):
    (tmp_path / "o.json").write_text(json.dumps({"initial_lr": 1e-4, "max_lr": 1e-3, "warmup_iters": 5,
                                                 "enable_lr_scheduler": True, "cosine_annealing_period": 30}))
    assert vis_lr([str(tmp_path / "o.json")]) == 0  # steps derived from the schedule
    assert_png(tmp_path / "lr.png")
    (tmp_path / "p.toml").write_text("[optim]\ninitial_lr = 1e-4\nenable_lr_scheduler = true\n"
                                     "cosine_annealing_period = 10\n")
    assert vis_lr([str(tmp_path / "p.toml"), "--steps", "20", "--out", str(tmp_path / "p.png")]) == 0
    assert_png(tmp_path / "p.png")


def test_vis_lr_from_metrics(tmp_path):
    write_run(tmp_path / "run")
    assert vis_lr([str(tmp_path / "run")]) == 0
    assert_png(tmp_path / "run" / "lr.png")


def test_vis_lr_errors(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("[optim]\ninitial_lr = -1\n")
    assert vis_lr([str(tmp_path / "bad.toml"), "--steps", "10"]) == 1
    assert "OptimConfig.initial_lr" in capsys.readouterr().err
    (tmp_path / "const.toml").write_text("[optim]\ninitial_lr = 1e-4\n")
    assert vis_lr([str(tmp_path / "const.toml")]) == 1  # no way to know the step count
    (tmp_path / "x.yaml").write_text("a: 1\n")
    assert vis_lr([str(tmp_path / "x.yaml"), "--steps", "3"]) == 1
    with pytest.raises(SystemExit) as e:
        vis_lr([str(tmp_path / "const.toml"), "--steps", "0"])
    assert e.value.code == 2


def test_calc_intermediate_size(capsys):
    assert cis.main(["4096", "--multiple-of", "256"]) == 0
    assert capsys.readouterr().out.strip() == "intermediate_size=11008"  # LLaMA-7B
    assert cis.main(["512"]) == 0
    assert capsys.readouterr().out.strip() == "intermediate_size=1408"
    assert cis.main(["512", "32"]) == 0  # the original's positional form
    assert capsys.readouterr().out.strip() == "intermediate_size=1376"
    for argv in (["0"], ["abc"], ["512", "--multiple-of", "0"], ["512", "32", "--multiple-of", "64"]):
        with pytest.raises(SystemExit) as e:
            cis.main(argv)
        assert e.value.code == 2


def test_calc_intermediate_size_matches_model_config():
    mc = pytest.importorskip("llm_trainer.model.config")
    for h in (64, 100, 512, 777, 4096):
        for m in (1, 8, 64, 256):
            assert cis.swiglu_intermediate_size(h, m) == mc.swiglu_intermediate_size(h, m)


def test_console_entry_points_exit_codes(tmp_path):
    f = write_run(tmp_path / "r", n=5)
    code = "import sys; from llm_trainer.cli.{m} import {fn}; sys.exit({fn}())"
    run = lambda m, fn, *args: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code.format(m=m, fn=fn), *args], cwd=REPO, capture_output=True, text=True)
    r = run("vis", "vis_log", str(f), "--out", str(tmp_path / "o.png"))
    assert r.returncode == 0, r.stderr
    assert_png(tmp_path / "o.png")
    assert run("vis", "vis_lr").returncode == 2  # argparse usage error
    r = run("calc_intermediate_size", "main", "768")
    assert r.returncode == 0 and r.stdout.strip() == "intermediate_size=2048"
