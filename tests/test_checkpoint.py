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
from llm_trainer.scheduler import WarmupCosineScheduler

REPO = Path(__file__).resolve().parents[1]


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16))
    m[1].weight = m[0].weight  # tied
    return m


def _train_state():
    m = _model()
    opt = build_optimizer(m, OptimConfig(initial_lr=1e-2, max_lr=1e-1, warmup_iters=2, enable_lr_scheduler=True,
                                         cosine_annealing_period=5))
    sch = WarmupCosineScheduler(opt, OptimConfig(initial_lr=1e-2, max_lr=1e-1, warmup_iters=2,
                                                 enable_lr_scheduler=True, cosine_annealing_period=5))
    for _ in range(3):
        loss = m(torch.tensor([[1, 2, 3]])).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sch.step()
    return m, opt, sch


def test_save_load_round_trip(tmp_path):
    m, opt, sch = _train_state()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = ck.save_checkpoint(tmp_path, 3, model_state=m.state_dict(), optimizer_state=opt.state_dict(),
                              scheduler_state=sch.state_dict(), data_position={"epoch": 0, "sample": 24},
                              extra={"scaler": {"scale": 65536.0}, "epoch": 0})
    assert path == tmp_path / "checkpoint-3" and (path / "checkpoint.json").is_file()
    expect = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)

    c = ck.load_checkpoint(path)
    assert c.step == 3 and c.data_position == {"epoch": 0, "sample": 24}
    assert c.extra == {"scaler": {"scale": 65536.0}, "epoch": 0}
    assert c.scheduler_state == sch.state_dict()
    for k, v in m.state_dict().items():
        assert torch.equal(c.model_state[k], v), k
    m2 = _model()
    m2.load_state_dict(c.model_state)
    assert m2[1].weight.data_ptr() == m2[0].weight.data_ptr()
    opt2 = build_optimizer(m2, OptimConfig(initial_lr=1e-2))
    opt2.load_state_dict(c.optimizer_state)
    for (_, a), (_, b) in zip(sorted(opt.state_dict()["state"].items()), sorted(opt2.state_dict()["state"].items())):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    ck.restore_rng_states(c.rng_states)
    assert (random.random(), np.random.rand()) == expect[:2] and torch.equal(torch.rand(1), expect[2])


def test_files_are_weights_only_loadable(tmp_path):
    m, opt, sch = _train_state()
    path = ck.save_checkpoint(tmp_path, 1, model_state=m.state_dict(), optimizer_state=opt.state_dict(),
                              scheduler_state=sch.state_dict())
    torch.load(path / "optimizer.pt", weights_only=True)
    torch.load(path / "trainer_state.pt", weights_only=True)


def test_unsafe_extra_needs_allow_pickle(tmp_path):
    path = ck.save_checkpoint(tmp_path, 1, extra={"obj": ck.Checkpoint})
    with pytest.raises(RuntimeError, match="allow_pickle"):
        ck.load_checkpoint(path)
    assert ck.load_checkpoint(path, allow_pickle=True).extra["obj"] is ck.Checkpoint


def test_keep_last_and_latest(tmp_path):
    for step in (10, 20, 30, 40):
        ck.save_checkpoint(tmp_path, step, model_state={"w": torch.full((2,), float(step))}, keep_last=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [30, 40]
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-40"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    # a directory passed to load_checkpoint resolves to its latest
    assert ck.load_checkpoint(tmp_path).step == 40
    # numeric, not lexicographic, ordering
    ck.save_checkpoint(tmp_path, 100)
    assert ck.latest_checkpoint(tmp_path).name == "checkpoint-100"


def test_latest_ignores_incomplete_and_temp(tmp_path):
    assert ck.latest_checkpoint(tmp_path / "missing") is None
    ck.save_checkpoint(tmp_path, 5)
    (tmp_path / ".tmp-step-9").mkdir()
    (tmp_path / "checkpoint-7").mkdir()  # no checkpoint.json: incomplete
    (tmp_path / ".trash-checkpoint-1").mkdir()
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-5"
    with pytest.raises(FileNotFoundError):
        ck.load_checkpoint(tmp_path / "checkpoint-7")
    # the next save removes leftovers of killed saves
    ck.save_checkpoint(tmp_path, 6)
    assert not (tmp_path / ".tmp-step-9").exists() and not (tmp_path / ".trash-checkpoint-1").exists()


def test_resave_same_step_replaces(tmp_path):
    ck.save_checkpoint(tmp_path, 1, model_state={"w": torch.zeros(1)})
    ck.save_checkpoint(tmp_path, 1, model_state={"w": torch.ones(1)})
    assert ck.load_checkpoint(tmp_path / "checkpoint-1").model_state["w"].item() == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]


def test_write_fn_and_begin_commit(tmp_path):
    def write(d):
        (d / "backend").mkdir()
        (d / "backend" / "shard0.bin").write_bytes(b"x" * 10)

    path = ck.save_checkpoint(tmp_path, 2, write_fn=write)
    assert (path / "backend" / "shard0.bin").read_bytes() == b"x" * 10
    assert "backend/shard0.bin" in ck.load_checkpoint(path).meta["files"]


def test_non_contiguous_and_shared_views(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    sd = {"t": base.t(), "a": base[0], "b": base[1], "same": base}
    ck.save_model_state(sd, tmp_path / "m.safetensors")
    back = ck.load_model_state(tmp_path / "m.safetensors")
    for k, v in sd.items():
        assert torch.equal(back[k], v), k


_CHILD = textwrap.dedent(r"""
    import os, sys, time, torch
    sys.path.insert(0, {repo!r})
    from llm_trainer import checkpoint as ck

    out, phase = sys.argv[1], sys.argv[2]
    ck.save_checkpoint(out, 1, model_state={{"w": torch.ones(4)}}, optimizer_state={{"state": {{}}}},
                       data_position={{"sample": 8}})

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
        real = ck._torch_save
        def slow_torch_save(obj, path):
            if path.name == "optimizer.pt":
                with open(path, "wb") as f:
                    f.write(b"\x80\x02partial"); f.flush()
                stall()
            real(obj, path)
        ck._torch_save = slow_torch_save
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
    big = {{"w": torch.randn(4 * 1024 * 1024)}}  # 16 MiB
    ck.save_checkpoint(out, 2, model_state=big, optimizer_state={{"state": {{}}, "x": torch.randn(1024)}},
                       data_position={{"sample": 16}})
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
    assert ck.latest_checkpoint(out) == out / "checkpoint-1"
    c = ck.load_checkpoint(ck.latest_checkpoint(out))
    assert c.step == 1 and c.data_position == {"sample": 8} and torch.equal(c.model_state["w"], torch.ones(4))
    # a resumed run saves normally and cleans the leftovers
    ck.save_checkpoint(out, 2, model_state={"w": torch.zeros(1)})
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
    latest = ck.latest_checkpoint(out)
    assert latest is not None and latest.name in ("checkpoint-1", "checkpoint-2")
    c = ck.load_checkpoint(latest)
    assert c.data_position == {"sample": 8 * c.step}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_and_fused_adamw(tmp_path):
    torch.cuda.manual_seed_all(5)
    torch.zeros(1, device="cuda")
    states = ck.capture_rng_states()
    assert "cuda" in states
    expect = torch.rand(3, device="cuda")
    path = ck.save_checkpoint(tmp_path, 1, rng_states=states)
    torch.cuda.manual_seed_all(9)
    ck.restore_rng_states(ck.load_checkpoint(path).rng_states)
    assert torch.equal(torch.rand(3, device="cuda"), expect)
    opt = build_optimizer(nn.Linear(4, 4).cuda(), OptimConfig())
    assert opt.defaults["fused"] is True
