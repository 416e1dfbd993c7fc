import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from llm_trainer.cli import calc_intermediate_size as cis
from llm_trainer.cli.vis import vis_log, vis_lr
from llm_trainer.configs import OptimConfig, TrainConfig
from llm_trainer.metrics import MetricsLogger, read_metrics
from llm_trainer.plots import metrics_figure, moving_average, plan_panels
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


def test_moving_average_is_a_trailing_mean_skipping_non_finite_values():
    assert moving_average([2.0, 4.0, 6.0, 8.0], 2) == [2.0, 3.0, 5.0, 7.0]
    out = moving_average([float("nan"), 1.0, float("nan"), 3.0, 5.0], 2)
    assert math.isnan(out[0]) and out[1:] == [1.0, 1.0, 2.0, 4.0]


def _titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


def _footer(fig) -> str:
    if hasattr(fig, "get_supxlabel"):                                # matplotlib >= 3.8
        return fig.get_supxlabel()
    return fig._supxlabel.get_text() if fig._supxlabel is not None else ""


def test_language_model_run_raw_by_default_constants_listed_not_drawn(tmp_path):
    f = write_run(tmp_path / "run")
    runs = [("run", read_metrics(f))]
    fig = metrics_figure(runs)
    assert _titles(fig) == ["loss", "grad_norm", "lr", "tokens_per_s"]
    loss_ax = fig.axes[0]
    assert [line.get_label() for line in loss_ax.get_lines()] == ["loss", "eval_loss"]  # train and eval together
    steps, values = loss_ax.get_lines()[0].get_data()
    recs = read_metrics(f)
    assert list(values) == [r["loss"] for r in recs]                                   # raw values, not smoothed
    assert all(line.get_alpha() is None for line in loss_ax.get_lines())
    assert "aux_loss = 0.01" in _footer(fig)                                              # constant: named, not drawn
    assert not any("aux_loss" in t for t in _titles(fig))
    w, h = fig.get_size_inches()
    assert w * 100 <= 1400 and h * 100 <= 800                                            # saved at 100 dpi


def test_smoothing_is_drawn_over_faint_raw_values_and_labelled(tmp_path):
    f = write_run(tmp_path / "run")
    fig = metrics_figure([("run", read_metrics(f))], smooth=5)
    ax = fig.axes[_titles(fig).index("grad_norm")]
    raw, smoothed = ax.get_lines()
    assert raw.get_alpha() < 0.5 and smoothed.get_label() == "smoothed (5)"
    assert list(smoothed.get_ydata()) == pytest.approx(moving_average(list(raw.get_ydata()), 5))
    assert list(raw.get_ydata()) == [r["grad_norm"] for r in read_metrics(f)]
    eval_line = [line for line in fig.axes[0].get_lines() if "eval_loss" in line.get_label()]
    assert [line.get_label() for line in eval_line] == ["eval_loss"]  # 3 points: too few to smooth, drawn raw


def test_a_series_constant_in_one_run_but_not_another_is_kept_and_copies_are_dropped(tmp_path):
    a = [{"step": s, "x": 1.0, "y": float(s), "reward/mean": s / 10, "reward/f/mean": s / 10} for s in range(1, 6)]
    b = [{"step": s, "x": float(s), "y": 2.0, "reward/mean": 0.5, "reward/f/mean": 0.5} for s in range(1, 6)]
    panels, omitted = plan_panels([("a", a), ("b", b)])
    assert [p.title for p in panels] == ["reward/mean", "x", "y"]
    assert omitted == {"reward/f/mean": "= reward/mean"}
    fig = metrics_figure([("a", a), ("b", b)])
    labels = [line.get_label() for line in fig.axes[1].get_lines()]
    assert labels == ["a", "b"]                                          # runs overlaid, labelled by run


def distinct_tokens(completion_ids, answer_ids):
    """A reward that varies from the first rollout on (a random policy's completions differ in it)."""
    return [len(set(c)) / 3 for c in completion_ids]


def test_a_single_record_or_a_run_where_nothing_varies_is_still_drawn(tmp_path):
    one = [{"step": 2, "loss": 1.5, "lr": 2e-5}]
    fig = metrics_figure([("one", one)])
    assert _titles(fig) == ["loss", "lr"] and not _footer(fig)      # a value logged once is a point, not a constant
    assert fig.axes[0].get_xlim() == (1.0, 3.0)
    flat = [{"step": s, "loss": 1.5, "lr": 2e-5} for s in range(1, 5)]
    assert _titles(metrics_figure([("flat", flat)])) == ["loss", "lr"]   # nothing varies: the constants are shown
    with pytest.raises(ValueError, match="no numeric metrics"):
        metrics_figure([("empty", [{"step": 1, "note": "x"}])])


@pytest.fixture(scope="module")
def rl_runs(tmp_path_factory):
    """metrics.jsonl of a short real GRPO run (a KL term, two inner epochs) and a short real PPO run."""
    from rl_helpers import grpo_train_config, ppo_train_config
    from llm_trainer.trainers.grpo import GRPOTrainer
    from llm_trainer.trainers.ppo import PPOTrainer
    root = tmp_path_factory.mktemp("rl_runs")
    cfg = grpo_train_config(root / "grpo", steps=5, batch_size=4, loss_beta=0.04, grpo_epochs=2, grpo_batch_size=8)
    cfg.log_interval = 1
    GRPOTrainer(train_config=cfg, reward_func=distinct_tokens).train()
    cfg = ppo_train_config(root / "ppo", steps=5, batch_size=8, ppo_epochs=2, ppo_batch_size=4)
    cfg.log_interval = 1
    PPOTrainer(train_config=cfg, reward_func=distinct_tokens).train()
    return root


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_rl_panels_reward_first_then_kl_and_clipping_then_lengths(rl_runs, stage):
    recs = read_metrics(rl_runs / stage)
    fig = metrics_figure([(stage, recs)])
    titles = _titles(fig)
    assert titles[0] == "reward/mean", titles
    kl = titles.index("KL") if "KL" in titles else titles.index("kl")
    clip = next(i for i, t in enumerate(titles) if "clip" in t or "ratio" in t)
    assert kl < clip < titles.index("completion_len") < titles.index("loss"), titles
    drawn = {line.get_label() for ax in fig.axes for line in ax.get_lines()} | set(titles)
    footer = _footer(fig)
    assert "lr = 0.003" in footer and "reward/distinct_tokens/mean = reward/mean" in footer   # constant; a copy
    assert not {"lr", "reward/distinct_tokens/mean"} & drawn
    constant = [k for k in recs[0] if isinstance(recs[0][k], float) and len({r.get(k) for r in recs}) == 1]
    assert constant and not set(constant) & drawn                             # every constant series left out
    assert len(fig.axes) <= 16 and fig.get_size_inches()[1] <= 8.0
    out = rl_runs / f"{stage}.png"
    assert vis_log([str(rl_runs / stage), "--out", str(out)]) == 0
    assert_png(out)
    assert vis_log([str(rl_runs / stage), "--out", str(rl_runs / f"{stage}_panels")]) == 0  # a PNG per panel
    files = sorted((rl_runs / f"{stage}_panels").iterdir())
    assert len(files) == len(titles) and (rl_runs / f"{stage}_panels" / "reward_mean.png") in files
    for f in files:
        assert_png(f)


def test_vis_log_single_png(tmp_path, capsys):
    f = write_run(tmp_path / "run_a")
    assert vis_log([str(f)]) == 0
    assert_png(tmp_path / "run_a" / "metrics.png")
    assert str(tmp_path / "run_a" / "metrics.png") in capsys.readouterr().out


def test_vis_log_runs_overlaid_per_key_dir(tmp_path):
    a = write_run(tmp_path / "a")
    b = write_run(tmp_path / "b", scale=1.3)
    out = tmp_path / "plots"
    assert vis_log([str(a), str(tmp_path / "b"), "--keys", "loss", "lr", "eval_loss", "--smooth", "4",
                    "--out", str(out)]) == 0
    for key in ("loss", "lr", "eval_loss"):
        assert_png(out / f"{key}.png")
    assert vis_log([str(a), "--keys", "time", "--out", str(out / "time.png")]) == 0   # bookkeeping, asked for
    assert_png(out / "time.png")
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
        vis_log([str(f), "--smooth", "0"])
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
