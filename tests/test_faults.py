"""Issue 12's faults, injected for real through the trainers: an output folder holding an earlier run, corrupted and
truncated checkpoints, a missing RNG file, a full disk (a real tmpfs), an eval set smaller than a batch, the last
partial batch, resuming on another batch size, NaN rewards, and what a run prints about itself."""
from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch

from llm_trainer import checkpoint as ck
from llm_trainer.configs import DataLoaderConfig, LossConfig
from llm_trainer.model import MoEConfig
from llm_trainer.trainers.pretrain import Trainer
from llm_trainer.trainers.sft import SFTTrainer

from trainer_utils import tiny_model_config, train_config, write_pretrain_tokens, write_sft


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.backend.unwrap(trainer.model).state_dict().items()}


def _pretrain(tmp_path, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_pretrain_tokens(tmp_path / "tokens.npy")
    kw.setdefault("max_steps", 4)
    return train_config(tmp_path, data, **kw)


# ------------------------------------------------------------------------------------------------ item 7
def test_a_fresh_run_into_an_earlier_runs_folder_is_refused_or_overwritten(tmp_path):
    Trainer(train_config=_pretrain(tmp_path, save_interval=2)).train()
    out = tmp_path / "out"
    assert (out / "checkpoint-4").is_dir() and (out / "metrics.jsonl").is_file()
    with pytest.raises(FileExistsError, match=rf"{out}.*earlier run.*resume_from='auto'.*overwrite_output_dir=True"):
        Trainer(train_config=_pretrain(tmp_path, save_interval=2))
    assert (out / "checkpoint-4").is_dir()                             # nothing was touched
    tr = Trainer(train_config=_pretrain(tmp_path, save_interval=3, max_steps=3, overwrite_output_dir=True))
    assert not (out / "checkpoint-4").exists() and (out / "metrics.jsonl").read_text() == ""   # a new log
    tr.train()
    steps = [r["step"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
    assert steps == [1, 2, 3] and [s for s, _ in ck.list_checkpoints(out)] == [3]


# ------------------------------------------------------------------------------------------------ item 9
def test_corrupted_checkpoints_fall_back_to_the_newest_intact_one(tmp_path):
    Trainer(train_config=_pretrain(tmp_path, max_steps=6, save_interval=2, keep_last_checkpoints=3)).train()
    out = tmp_path / "out"
    weights = out / "checkpoint-6" / "backend" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x01                                          # a bit flip inside a weight
    weights.write_bytes(bytes(raw))
    state = out / "checkpoint-4" / "trainer_state.json"
    state.write_text(state.read_text()[:40])                           # truncated
    with pytest.raises(ck.CheckpointError, match=r"checkpoint-6.*model.safetensors: SHA-256 differs"):
        Trainer(train_config=_pretrain(tmp_path, max_steps=6, resume_from=str(out / "checkpoint-6")))
    with pytest.warns(UserWarning) as record:
        tr = Trainer(train_config=_pretrain(tmp_path, max_steps=6, resume_from="auto"))
    messages = " ".join(str(w.message) for w in record)
    assert "skipping" in messages and "checkpoint-6" in messages and "checkpoint-4" in messages
    assert tr.global_step == 2 and tr.resumed_from == out / "checkpoint-2"
    saved = ck.load_model_state(out / "checkpoint-2" / "backend" / "model.safetensors")
    for k, v in _weights(tr).items():
        assert torch.equal(v, saved[k]), k
    tr.train()
    assert tr.global_step == 6


def test_a_missing_rng_file_warns_that_the_resume_is_not_exact(tmp_path):
    Trainer(train_config=_pretrain(tmp_path, max_steps=4, save_interval=2)).train()
    ckpt_dir = tmp_path / "out" / "checkpoint-4"
    (ckpt_dir / "rng_rank0.pt").unlink()
    manifest = json.loads((ckpt_dir / "checkpoint.json").read_text())
    del manifest["files"]["rng_rank0.pt"]                               # an old/edited checkpoint without it
    (ckpt_dir / "checkpoint.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="rng_rank0.pt is missing.*not bit-exact"):
        Trainer(train_config=_pretrain(tmp_path, max_steps=6, resume_from="auto"))


# ------------------------------------------------------------------------------------------------ item 8
@pytest.mark.parametrize("small_disk", ["2m"], indirect=True)
def test_a_full_disk_during_a_save_keeps_the_run_resumable(tmp_path, small_disk):
    data = write_pretrain_tokens(tmp_path / "tokens.npy")
    out = small_disk / "out"

    def cfg(**kw):
        kw = {"max_steps": 4, **kw}
        return train_config(tmp_path, data, output_dir=str(out), save_interval=2, **kw)

    Trainer(train_config=cfg(max_steps=2)).train()                        # checkpoint-2 fits
    size = ck.checkpoint_size(out / "checkpoint-2")
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (free - size // 2))                      # room for half a checkpoint
    tr = Trainer(train_config=cfg(resume_from="auto"))
    with pytest.raises(ck.CheckpointSpaceError, match=rf"{out}.*{size:,}"):
        tr.train()                                                         # refused before writing a byte
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".tmp", "checkpoint"))) == ["checkpoint-2"]
    assert ck.verify_checkpoint(out / "checkpoint-2") == []
    # the same when the disk fills up in the middle of the save (no earlier checkpoint to size it from)
    (out / "checkpoint-2").rename(small_disk / "kept")
    with pytest.raises(ck.CheckpointSpaceError, match="filled up while writing .tmp-step-2"):
        Trainer(train_config=cfg(overwrite_output_dir=True)).train()
    assert not any(p.name.startswith(".tmp") for p in out.iterdir())
    ballast.unlink()
    (small_disk / "kept").rename(out / "checkpoint-2")
    tr = Trainer(train_config=cfg(resume_from="auto"))
    assert tr.global_step == 2
    tr.train()
    assert [s for s, _ in ck.list_checkpoints(out)] == [2, 4]


# ----------------------------------------------------------------------------------------------- item 11
def test_every_eval_sample_counts_even_fewer_than_a_batch(tmp_path):
    data = write_sft(tmp_path / "sft", n=16)
    for n_eval in (3, 10):                                               # < batch_size, and not a multiple of it
        held = write_sft(tmp_path / f"held{n_eval}", n=n_eval, seed=5)
        tr = SFTTrainer(train_config=train_config(tmp_path / f"e{n_eval}", data, eval_file_dataset=[str(held)],
                                                  batch_size=4, max_steps=1))
        got = tr.eval_dataset_metrics()["eval_loss"]
        model = tr.backend.unwrap(tr.model).eval()
        total, tokens = 0.0, 0
        with torch.no_grad():
            for i in range(n_eval):                                     # one unpadded sample at a time
                item = tr.eval_dataset[i]
                logits = model(input_ids=item["input_ids"][None]).logits[0]
                labels = item["labels"][1:]
                keep = labels != -100
                total += float(torch.nn.functional.cross_entropy(logits[:-1][keep], labels[keep], reduction="sum"))
                tokens += int(keep.sum())
        assert got == pytest.approx(total / tokens, rel=1e-5)
        assert math.isfinite(got) and got > 1.0


def test_drop_last_false_trains_on_the_last_partial_batch(tmp_path):
    data = write_sft(tmp_path / "sft", n=10)
    seen = {}
    for drop in (True, False):
        cfg = train_config(tmp_path / str(drop), data, batch_size=4, n_epochs=1,
                           data_loader_config=DataLoaderConfig(drop_last=drop))
        tr = SFTTrainer(train_config=cfg)
        sizes = [sum(b["input_ids"].size(0) for b in w) for w in tr.training_windows() if not tr.train_step(w)
                 .get("_skipped")]
        seen[drop] = (tr.total_steps, sizes)
    assert seen[True] == (2, [4, 4]) and seen[False] == (3, [4, 4, 2])


# ----------------------------------------------------------------------------------------------- item 14
def test_resume_on_another_batch_size_needs_the_reshard_flag(tmp_path):
    Trainer(train_config=_pretrain(tmp_path, max_steps=2, save_interval=2, batch_size=4)).train()
    with pytest.raises(ValueError, match=r"batch_size 4 → 2.*reshard_on_resume=True"):
        Trainer(train_config=_pretrain(tmp_path, max_steps=8, batch_size=2, resume_from="auto"))
    with pytest.warns(UserWarning, match=r"re-sharded.*8 samples.*continues at sample 8"):
        tr = Trainer(train_config=_pretrain(tmp_path, max_steps=8, batch_size=2, resume_from="auto",
                                            reshard_on_resume=True))
    assert tr.global_step == 2 and tr.epoch_position == 4                # 8 samples = 4 batches of 2
    tr.train()
    assert tr.global_step == 8


# ----------------------------------------------------------------------------------------------- item 16
def test_nan_rewards_are_skipped_and_counted_with_nan_policy_skip(tmp_path):
    from llm_trainer import GRPOTrainer
    from rl_helpers import copy_reward, grpo_train_config

    calls = {"n": 0}

    def flaky(completion_ids, answer_ids):
        calls["n"] += 1
        r = copy_reward(completion_ids, answer_ids)
        if calls["n"] % 2 == 1:
            r[0] = float("nan")                                           # one bad sample in every other rollout
        return r

    cfg = grpo_train_config(tmp_path, steps=4)
    cfg.nan_policy = "skip"
    tr = GRPOTrainer(train_config=cfg, reward_func=flaky)
    tr.train()
    assert tr.global_step == 4 and tr.skipped_nonfinite_rewards >= 2


# ------------------------------------------------------------------------------------------------ item 3
def test_a_run_prints_its_summary_and_where_it_saved(tmp_path, capfd):
    tr = Trainer(train_config=_pretrain(tmp_path, max_steps=2))
    tr.train()
    err = capfd.readouterr().err
    for needle in ("Trainer (pretrain)", "parameters", "trainable", "samples", "tokens", "optimizer steps",
                   "rank(s)", "precision fp32", str(tmp_path / "out"), "done: 2 steps",
                   f"saved to {tmp_path / 'out' / 'final'}"):
        assert needle in err, needle


# ------------------------------------------------------------------------------------------ issue 11 loose ends
def test_loss_config_moe_coefficients_reach_the_model(tmp_path):
    moe = MoEConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, aux_loss_coef=0.01)
    cfg = _pretrain(tmp_path, model_config=tiny_model_config(moe=moe), max_steps=1,
                    loss_config=LossConfig(moe_aux_loss_coef=0.5, moe_z_loss_coef=0.1))
    tr = Trainer(train_config=cfg)
    assert tr.model_config.moe.aux_loss_coef == 0.5 and tr.model_config.moe.z_loss_coef == 0.1
    out = tr.backend.unwrap(tr.model)(input_ids=torch.randint(1, 90, (2, 8)))
    m = out.moe_metrics
    torch.testing.assert_close(out.aux_loss, 0.5 * m["moe_aux_loss"] + 0.1 * m["moe_z_loss"])
    with pytest.raises(ValueError, match="moe_aux_loss_coef is set but the model has no MoE layers"):
        Trainer(train_config=_pretrain(tmp_path / "dense", loss_config=LossConfig(moe_aux_loss_coef=0.5)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(train_config=_pretrain(tmp_path / "plain", max_steps=1))  # no override: no warning either


def test_gradient_checkpointing_selects_blocks(tmp_path):
    for setting, want in ((True, {0, 1, 2, 3}), (2, {0, 2}), ([-1], {3}), (False, set())):
        tr = Trainer(train_config=_pretrain(tmp_path / str(setting), max_steps=1, gradient_checkpointing=setting,
                                            model_config=tiny_model_config(num_hidden_layers=4)))
        assert tr.backend.unwrap(tr.model)._checkpointed == want, setting
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        _pretrain(tmp_path / "bad", gradient_checkpointing="yes")


def test_a_missing_weights_path_names_the_setting(tmp_path):
    from llm_trainer.configs import KDConfig, PretrainConfig
    with pytest.raises(FileNotFoundError, match=r"KDConfig.teacher_model_path: .*nowhere does not exist"):
        Trainer(train_config=_pretrain(tmp_path / "kd", pretrain_config=PretrainConfig(
            kd_config=KDConfig(teacher_model_path=str(tmp_path / "nowhere")))))
    with pytest.raises(FileNotFoundError, match=r"TrainConfig.init_weights_path: .*nowhere does not exist"):
        Trainer(train_config=_pretrain(tmp_path / "init", init_weights_path=str(tmp_path / "nowhere")))
