"""Built-in callbacks on real (tiny) training runs: EarlyStopping stops when its metric stops improving (min and max
modes, min_delta, patience, a missing metric); ``report_to`` adds the TensorBoard / W&B reporters, whose output is
read back with TensorBoard's own event reader and from W&B's offline run file and compared with ``metrics.jsonl``.
The 2-rank early stop runs through the CLI: ``tests/test_cli_train.py::test_ddp_train_runs_a_config_file``."""
from __future__ import annotations

import json
import struct
import time
import sys
import warnings

import pytest

from llm_trainer.metrics import read_metrics
from llm_trainer.trainers.callbacks import Callback
from llm_trainer.trainers.callbacks_builtin import (EarlyStopping, TensorBoardCallback, WandbCallback,
                                                    reporting_callbacks)
from llm_trainer.trainers.pretrain import Trainer

from trainer_utils import train_config, write_pretrain_tokens


def scripted(values):
    """An evaluator returning ``values[k]`` as 'score' at the k-th evaluation."""
    calls = []

    def score(trainer):
        calls.append(trainer.global_step)
        return {"score": values[len(calls) - 1]}
    return score


class Steps(Callback):
    def __init__(self):
        self.evaluated = []

    def on_evaluate(self, trainer, control, metrics):
        self.evaluated.append(trainer.global_step)


def _run(tmp_path, callbacks=(), evaluators=(), **kw):
    data = write_pretrain_tokens(tmp_path / "tokens.npy")
    kw.setdefault("max_steps", 10)
    tr = Trainer(train_config=train_config(tmp_path, data, **kw), callbacks=list(callbacks),
                 evaluators=list(evaluators))
    tr.train()
    return tr


@pytest.mark.parametrize("mode, values, patience, min_delta, stop_step, best, best_step", [
    ("min", [1.0, 0.9, 0.8, 0.85, 0.81, 0.7, 0.6], 2, 0.0, 5, 0.8, 3),    # 0.85, 0.81 do not beat 0.8
    ("min", [1.0, 0.9, 0.8, 0.85, 0.7, 0.75, 0.72], 2, 0.0, 7, 0.7, 5),   # eval 5 improves: the count restarts
    ("min", [1.0, 0.95, 0.92, 0.5, 0.4, 0.3, 0.2], 2, 0.1, 3, 1.0, 1),    # 0.95, 0.92 improve by < min_delta
    ("max", [0.1, 0.2, 0.2, 0.3, 0.1, 0.1, 0.1], 3, 0.0, 7, 0.3, 4),      # a tie is no improvement
    ("max", [0.1, float("nan"), 0.05, 0.5, 0.6, 0.7, 0.8], 2, 0.0, 3, 0.1, 1),   # NaN: no improvement
])
def test_early_stopping_stops_when_the_metric_stops_improving(tmp_path, mode, values, patience, min_delta,
                                                               stop_step, best, best_step):
    stopper = EarlyStopping(metric="score", mode=mode, patience=patience, min_delta=min_delta)
    steps = Steps()
    tr = _run(tmp_path, [stopper, steps], [scripted(values + [0.0] * 10)], eval_interval=1)
    assert tr.global_step == stop_step
    assert steps.evaluated == list(range(1, stop_step + 1))             # no evaluation after the stop
    assert (stopper.best, stopper.best_step) == (best, best_step)
    assert (tmp_path / "out" / "final").is_dir()                 # a stopped run still exports


def test_early_stopping_on_eval_loss_of_a_real_eval_set(tmp_path):
    """A learning rate of ~0 keeps eval_loss flat: with min_delta 0.01 the run stops after patience evaluations."""
    from llm_trainer.configs import OptimConfig
    data = write_pretrain_tokens(tmp_path / "tokens.npy")
    stopper = EarlyStopping(patience=2, min_delta=0.01)
    tr = _run(tmp_path, [stopper], eval_interval=1, eval_file_dataset=[str(data)], eval_batches=1,
              optim_config=OptimConfig(initial_lr=1e-9))
    assert tr.global_step == 3 and stopper.best_step == 1
    evals = [r["eval_loss"] for r in read_metrics(tmp_path / "out") if "eval_loss" in r]
    assert len(evals) == 3 and max(evals) - min(evals) < 0.01


def test_early_stopping_without_its_metric_warns_and_never_stops(tmp_path):
    with pytest.warns(UserWarning, match="no metric 'eval_acc'.*score"):
        tr = _run(tmp_path, [EarlyStopping(metric="eval_acc", patience=1)], [scripted([1.0] * 20)],
                  eval_interval=1, max_steps=4)
    assert tr.global_step == 4


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="lowest"), "mode must be 'min' or 'max'"), (dict(patience=0), "patience must be an int >= 1"),
    (dict(patience=1.5), "patience"), (dict(min_delta=-1), "min_delta must be a finite number >= 0"),
    (dict(min_delta=float("inf")), "min_delta"), (dict(metric=""), "metric must be a metric name")])
def test_early_stopping_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EarlyStopping(**kwargs)


def _scalars_from_tensorboard(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return acc, {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_report_to_tensorboard_writes_what_metrics_jsonl_has(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is a test extra (pip install tensorboard)")
    data = write_pretrain_tokens(tmp_path / "tokens.npy")
    tr = _run(tmp_path, max_steps=4, eval_interval=2, eval_file_dataset=[str(data)], eval_batches=1,
              report_to=["tensorboard"])
    assert [type(cb) for cb in tr.callbacks.callbacks] == [TensorBoardCallback]
    acc, scalars = _scalars_from_tensorboard(tmp_path / "out" / "tensorboard")
    records = read_metrics(tmp_path / "out")
    train = {r["step"]: r for r in records if "loss" in r}
    assert sorted(train) == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm"):
        assert scalars[key] == pytest.approx({s: r[key] for s, r in train.items()}, rel=1e-6)
    assert scalars["eval_loss"] == pytest.approx({r["step"]: r["eval_loss"] for r in records if "eval_loss" in r},
                                                 rel=1e-6)
    assert sorted(scalars["eval_loss"]) == [2, 4]
    assert "config" in "".join(acc.Tags()["tensors"])                   # the run's config as text


def test_an_explicit_reporter_replaces_the_automatic_one(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is a test extra (pip install tensorboard)")
    mine = TensorBoardCallback(log_dir=tmp_path / "tb_elsewhere")
    tr = _run(tmp_path, [mine], max_steps=2, report_to=["tensorboard"])
    assert tr.callbacks.callbacks == [mine]
    assert not (tmp_path / "out" / "tensorboard").exists()
    _, scalars = _scalars_from_tensorboard(tmp_path / "tb_elsewhere")
    assert sorted(scalars["loss"]) == [1, 2]
    assert [type(c) for c in reporting_callbacks(["wandb", "tensorboard", "wandb"], [mine])] == [WandbCallback]


def _wandb_history(run_dir):
    """The history rows of an offline W&B run, read from its ``run-*.wandb`` file (a LevelDB-style log of
    protobuf records: 7-byte file header, 32 KiB blocks, 7-byte record headers, FULL/FIRST/MIDDLE/LAST chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    raw, pos, chunk, rows = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        chunk += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):                      # FULL or LAST: a whole record
            rec = pb.Record()
            rec.ParseFromString(chunk)
            chunk = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in rec.history.item})
    return rows


def test_report_to_wandb_offline_logs_what_metrics_jsonl_has(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is a test extra (pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _run(tmp_path, max_steps=3, report_to=["wandb"], run_name="cli-test")
    # W&B's service process writes the run file asynchronously: on a loaded machine give it time to flush
    deadline = time.monotonic() + 60
    while True:
        rows = _wandb_history(tmp_path / "out")
        if sum("loss" in r for r in rows) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    train = {r["step"]: r for r in read_metrics(tmp_path / "out") if "loss" in r}
    logged = {row["_step"]: row for row in rows if "loss" in row}
    assert sorted(logged) == [1, 2, 3]
    for step, rec in train.items():
        assert logged[step]["loss"] == pytest.approx(rec["loss"], rel=1e-9)
        assert logged[step]["lr"] == pytest.approx(rec["lr"], rel=1e-9)


def test_a_missing_reporting_package_warns_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)      # import → ImportError
    monkeypatch.setitem(sys.modules, "wandb", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = _run(tmp_path, max_steps=2, report_to=["tensorboard", "wandb"])
    messages = " ".join(str(w.message) for w in caught)
    assert "pip install tensorboard" in messages and "pip install wandb" in messages
    assert tr.global_step == 2 and len(read_metrics(tmp_path / "out")) == 2
