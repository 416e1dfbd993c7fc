"""The checkpoint transaction and manifest (llm_trainer.checkpoint): atomic saves that survive SIGKILL at any point,
rotation, weights_only loading, SHA-256 verification that catches truncation and bit flips, fall-back to the newest
intact checkpoint, and a full disk (a real tmpfs) that never destroys the last good checkpoint."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from llm_trainer import checkpoint as ck
from llm_trainer.configs import OptimConfig
from llm_trainer.optim import build_optimizer

REPO = Path(__file__).resolve().parents[1]


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16))
    m[1].weight = m[0].weight  # tied
    return m


def _trained():
    m = _model()
    opt = build_optimizer(m, OptimConfig(initial_lr=1e-2))
    for _ in range(3):
        m(torch.tensor([[1, 2, 3]])).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return m, opt


def writer(model=None, optimizer=None, position=None):
    """What a training loop writes: weights (safetensors), optimizer state, RNG, a JSON position."""
    def write(d: Path) -> None:
        if model is not None:
            ck.save_model_state(model, d / "model.safetensors")
        if optimizer is not None:
            ck.save_tensor_state(optimizer, d / "optimizer.pt")
        ck.save_rng_states(d / "rng_rank0.pt")
        (d / "trainer_state.json").write_text(json.dumps(position or {}))
    return write


def test_round_trip_is_weights_only_and_restores_rng(tmp_path):
    m, opt = _trained()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = ck.save_checkpoint(tmp_path, 3, writer(m.state_dict(), opt.state_dict(), {"sample": 24}))
    assert path == tmp_path / "checkpoint-3" and ck.verify_checkpoint(path) == []
    expect = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    state = ck.load_model_state(path / "model.safetensors")
    m2 = _model()
    m2.load_state_dict(state)
    assert m2[1].weight.data_ptr() == m2[0].weight.data_ptr()          # tied weights stored once, restored tied
    opt2 = build_optimizer(m2, OptimConfig(initial_lr=1e-2))
    opt2.load_state_dict(ck.load_tensor_state(path / "optimizer.pt"))  # weights_only=True
    for (_, a), (_, b) in zip(sorted(opt.state_dict()["state"].items()), sorted(opt2.state_dict()["state"].items())):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    ck.restore_rng_states(ck.load_rng_states(path / "rng_rank0.pt"))   # weights_only=True too
    assert (random.random(), np.random.rand()) == expect[:2] and torch.equal(torch.rand(1), expect[2])
    manifest = ck.read_manifest(path)
    assert manifest["step"] == 3 and set(manifest["files"]) == {"model.safetensors", "optimizer.pt",
                                                                 "rng_rank0.pt", "trainer_state.json"}


def test_rng_files_refuse_arbitrary_objects(tmp_path):
    torch.save({"obj": ck.CheckpointError}, tmp_path / "rng.pt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        ck.load_rng_states(tmp_path / "rng.pt")


def test_keep_last_latest_and_leftovers(tmp_path):
    for step in (10, 20, 30, 40):
        ck.save_checkpoint(tmp_path, step, writer(position={"step": step}), keep_last=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [30, 40]
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-40"
    ck.save_checkpoint(tmp_path, 100, writer())
    assert ck.latest_checkpoint(tmp_path).name == "checkpoint-100"   # numeric, not lexicographic
    (tmp_path / ".tmp-step-9").mkdir()
    (tmp_path / "checkpoint-700").mkdir()                             # no manifest: incomplete, never used
    (tmp_path / ".trash-checkpoint-1").mkdir()
    assert ck.latest_checkpoint(tmp_path).name == "checkpoint-100"
    assert "no checkpoint.json" in ck.verify_checkpoint(tmp_path / "checkpoint-700")[0]
    assert {p.name for p in ck.clean_partial(tmp_path)} == {".tmp-step-9", ".trash-checkpoint-1"}
    ck.save_checkpoint(tmp_path, 101, writer())
    ck.save_checkpoint(tmp_path, 101, writer(position={"again": 1}))  # re-save of a step replaces it
    assert json.loads((tmp_path / "checkpoint-101" / "trainer_state.json").read_text()) == {"again": 1}


def test_truncation_and_bit_flips_are_caught_and_resume_falls_back(tmp_path):
    m, opt = _trained()
    for step in (1, 2, 3):
        ck.save_checkpoint(tmp_path, step, writer(m.state_dict(), opt.state_dict(), {"step": step}))
    assert ck.resumable_checkpoint(tmp_path) == (tmp_path / "checkpoint-3", [])
    weights = tmp_path / "checkpoint-3" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0x10                                                    # one flipped bit inside a tensor
    weights.write_bytes(bytes(raw))
    opt_file = tmp_path / "checkpoint-2" / "optimizer.pt"
    opt_file.write_bytes(opt_file.read_bytes()[:100])                  # truncated
    path, skipped = ck.resumable_checkpoint(tmp_path)
    assert path == tmp_path / "checkpoint-1"
    assert [p.name for p, _ in skipped] == ["checkpoint-3", "checkpoint-2"]
    assert "SHA-256 differs" in skipped[0][1][0] and "model.safetensors" in skipped[0][1][0]
    assert "truncated" in skipped[1][1][0] and "optimizer.pt" in skipped[1][1][0]
    (tmp_path / "checkpoint-1" / "rng_rank0.pt").unlink()
    assert ck.verify_checkpoint(tmp_path / "checkpoint-1") == [f"{tmp_path / 'checkpoint-1' / 'rng_rank0.pt'}: missing"]
    (tmp_path / "checkpoint-1" / "checkpoint.json").write_text("{not json")
    assert "unreadable" in ck.verify_checkpoint(tmp_path / "checkpoint-1")[0]
    assert ck.resumable_checkpoint(tmp_path)[0] is None


def test_non_contiguous_and_shared_views(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    sd = {"t": base.t(), "a": base[0], "b": base[1], "same": base}
    ck.save_model_state(sd, tmp_path / "m.safetensors")
    back = ck.load_model_state(tmp_path / "m.safetensors")
    for k, v in sd.items():
        assert torch.equal(back[k], v), k


# ------------------------------------------------------------------------------------------------ full disk
def test_full_disk_keeps_the_last_checkpoint_and_says_what_is_needed(small_disk):
    out = small_disk / "run"
    ck.save_checkpoint(out, 1, writer({"w": torch.ones(256 * 1024)}))     # 1 MiB
    previous = ck.checkpoint_size(out / "checkpoint-1")
    with pytest.raises(ck.CheckpointSpaceError, match=r"filled up while writing .tmp-step-2"):
        ck.save_checkpoint(out, 2, writer({"w": torch.ones(1024 * 1024)}))   # 4 MiB: ENOSPC while writing
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]     # no partial folder left
    assert ck.verify_checkpoint(out / "checkpoint-1") == []
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (int(2.6 * 1024 * 1024)))                 # leave less than the last checkpoint
    with pytest.raises(ck.CheckpointSpaceError, match=rf"{previous:,}.* free"):
        ck.save_checkpoint(out, 3, writer({"w": torch.ones(256 * 1024)}), needed_bytes=previous)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]
    ballast.unlink()
    ck.save_checkpoint(out, 3, writer({"w": torch.ones(256 * 1024)}), needed_bytes=previous, keep_last=1)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3"]


# ------------------------------------------------------------------------------------------------ SIGKILL
_CHILD = textwrap.dedent(r"""
    import json, os, sys, time, torch
    sys.path.insert(0, {repo!r})
    from llm_trainer import checkpoint as ck

    def write_for(step, weights):
        def write(d):
            ck.save_model_state(weights, d / "model.safetensors")
            ck.save_tensor_state({{"state": {{}}, "x": torch.randn(1024)}}, d / "optimizer.pt")
            (d / "trainer_state.json").write_text(json.dumps({{"sample": 8 * step}}))
        return write

    out, phase = sys.argv[1], sys.argv[2]
    ck.save_checkpoint(out, 1, write_for(1, {{"w": torch.ones(4)}}))

    def stall():
        print("STALLED", flush=True)
        time.sleep(120)

    if phase == "model":  # killed half-way through writing the weights file
        from safetensors.torch import save as to_bytes
        def slow_save(tensors, path, metadata=None):
            data = to_bytes(tensors, metadata=metadata)
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2]); f.flush()
                stall()
        ck.safetensors_save_file = slow_save
    elif phase == "optimizer":  # weights complete, optimizer state half-written
        real = ck.save_tensor_state
        def slow_tensor_save(obj, path):
            with open(path, "wb") as f:
                f.write(b"\x80\x02partial"); f.flush()
            stall()
        ck.save_tensor_state = slow_tensor_save
    elif phase == "commit":  # everything written and fsynced, killed just before the rename
        real_meta = ck._fsync_dir
        calls = []
        def slow_fsync_dir(path):
            real_meta(path)
            if str(path).endswith(".tmp-step-2"):
                calls.append(path)
                if len(calls) == 2:  # the fsync after checkpoint.json, right before os.rename
                    assert os.path.exists(os.path.join(path, "checkpoint.json"))
                    stall()
        ck._fsync_dir = slow_fsync_dir
    ck.save_checkpoint(out, 2, write_for(2, {{"w": torch.randn(4 * 1024 * 1024)}}))  # 16 MiB
    print("FINISHED", flush=True)
""")


def _run_child(tmp_path, phase):
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(repo=str(REPO)))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(out), phase], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, out


@pytest.mark.parametrize("phase", ["model", "optimizer", "commit"])
def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path, phase):
    proc, out = _run_child(tmp_path, phase)
    try:
        line = proc.stdout.readline()  # blocks until the child is stalled inside save_checkpoint
        assert line.strip() == "STALLED", (line, proc.stderr.read() if proc.poll() is not None else "")
        assert (out / ".tmp-step-2").is_dir()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert ck.resumable_checkpoint(out) == (out / "checkpoint-1", [])
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text()) == {"sample": 8}
    assert torch.equal(ck.load_model_state(out / "checkpoint-1" / "model.safetensors")["w"], torch.ones(4))
    # a resumed run saves normally and cleans the leftovers
    ck.save_checkpoint(out, 2, writer({"w": torch.zeros(1)}))
    assert ck.latest_checkpoint(out) == out / "checkpoint-2"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-2"]


def test_sigkill_at_random_time_never_corrupts(tmp_path):
    """No stall hook: kill a real 16 MiB save at whatever point it has reached."""
    proc, out = _run_child(tmp_path, "none")
    try:
        deadline = time.monotonic() + 60
        while not (out / ".tmp-step-2").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    latest, skipped = ck.resumable_checkpoint(out)
    assert latest is not None and latest.name in ("checkpoint-1", "checkpoint-2") and skipped == []
    step = ck.read_manifest(latest)["step"]
    assert json.loads((latest / "trainer_state.json").read_text()) == {"sample": 8 * step}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_and_fused_adamw(tmp_path):
    torch.cuda.manual_seed_all(5)
    torch.zeros(1, device="cuda")
    ck.save_rng_states(tmp_path / "rng.pt")
    expect = torch.rand(3, device="cuda")
    torch.cuda.manual_seed_all(9)
    ck.restore_rng_states(ck.load_rng_states(tmp_path / "rng.pt"))
    assert torch.equal(torch.rand(3, device="cuda"), expect)
    opt = build_optimizer(nn.Linear(4, 4).cuda(), OptimConfig())
    assert opt.defaults["fused"] is True
