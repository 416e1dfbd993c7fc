"""Callbacks: the order of the events, stop / save / evaluate requests, main-rank-only callbacks, and a stop
requested on rank 0 stopping both ranks of a real 2-rank run."""
from __future__ import annotations

import json
import os
import sys

import pytest

from llm_trainer.trainers.callbacks import Callback
from llm_trainer.trainers.pretrain import Trainer

from trainer_utils import train_config, write_pretrain_tokens

HERE = os.path.dirname(os.path.abspath(__file__))


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_train_begin(self, trainer, control):
        self.events.append(("train_begin", trainer.global_step))

    def on_step_begin(self, trainer, control):
        self.events.append(("step_begin", trainer.global_step))

    def on_step_end(self, trainer, control, stats):
        assert "loss" in stats
        self.events.append(("step_end", trainer.global_step))

    def on_log(self, trainer, control, logs):
        self.events.append(("log", logs["step"]))

    def on_evaluate(self, trainer, control, metrics):
        self.events.append(("evaluate", trainer.global_step))

    def on_save(self, trainer, control, path):
        self.events.append(("save", path.name))

    def on_train_end(self, trainer, control, results):
        self.events.append(("train_end", trainer.global_step))


def _cfg(tmp_path, **kw):
    data = write_pretrain_tokens(tmp_path / "tokens.npy")
    return train_config(tmp_path, data, eval_file_dataset=[str(data)], eval_batches=1, **kw)


def test_events_arrive_in_order(tmp_path):
    rec = Recorder()
    Trainer(train_config=_cfg(tmp_path, max_steps=4, log_interval=2, eval_interval=2, save_interval=4),
            callbacks=[rec]).train()
    assert rec.events == [
        ("train_begin", 0),
        ("step_begin", 0), ("step_end", 1),
        ("step_begin", 1), ("step_end", 2), ("log", 2), ("evaluate", 2),
        ("step_begin", 2), ("step_end", 3),
        ("step_begin", 3), ("step_end", 4), ("log", 4), ("evaluate", 4), ("save", "checkpoint-4"),
        ("train_end", 4)]


def test_stop_save_and_evaluate_requests(tmp_path):
    class Steer(Callback):
        def on_step_end(self, trainer, control, stats):
            if trainer.global_step == 1:
                control.should_save = True
            if trainer.global_step == 2:
                control.should_evaluate = True
            if trainer.global_step == 3:
                control.should_stop = True

    rec = Recorder()
    tr = Trainer(train_config=_cfg(tmp_path, max_steps=10, eval_interval=None, save_interval=None),
                 callbacks=[Steer(), rec])
    tr.train()
    assert tr.global_step == 3
    assert [e for e in rec.events if e[0] in ("save", "evaluate")] == [("save", "checkpoint-1"), ("evaluate", 2),
                                                                        ("evaluate", 3)]   # eval_interval=None: at the end
    assert (tmp_path / "out" / "final").is_dir()                       # a stopped run still exports


def test_callbacks_must_be_callback_instances(tmp_path):
    with pytest.raises(TypeError, match="Callback instances"):
        Trainer(train_config=_cfg(tmp_path, max_steps=1), callbacks=[lambda *a: None])


@pytest.mark.distributed
def test_a_stop_on_rank_0_stops_both_ranks(tmp_path):
    sys.path.insert(0, os.path.join(HERE, "dist_scripts"))
    from runner import torchrun
    data = write_pretrain_tokens(tmp_path / "tokens.npy")
    proc = torchrun("callbacks_stop.py", [str(tmp_path), str(data)], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["world"] == 2 and r["step"] == 3
        assert r["events"] == [["step", 1], ["step", 2], ["step", 3], ["end", 3]]
