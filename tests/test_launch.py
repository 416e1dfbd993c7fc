"""Launchers: argument pass-through, exit codes, the launch banner, --dry-run for every branch. Real processes, no
mocks of what runs; only the branch conditions (CUDA present, DeepSpeed importable) are forced for the dry-run
tests. ``ds_train`` is launched for real with 2 CPU ranks (DS_ACCELERATOR=cpu, gloo), also on example/pretrain.py."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_scripts"))
from runner import ROOT, SCRIPTS, subprocess_env  # noqa: E402

from llm_trainer.cli import launch  # noqa: E402

EXIT = os.path.join(SCRIPTS, "exit_with.py")
STRICT = os.path.join(SCRIPTS, "strict_args.py")
TRICKY = ["--lr", "3e-4", "--name", "a b 'c'", "--nproc", "7", "--dry-run", "-m", "x;y", ""]


def run_launcher(fn: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    code = f"from llm_trainer.cli.launch import {fn}; {fn}()"
    return subprocess.run([sys.executable, "-c", code, *args], env=subprocess_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def argv_lines(stdout: str, tag: str = "ARGV_JSON") -> list[dict]:
    return [json.loads(line.split(" ", 1)[1]) for line in stdout.splitlines() if line.startswith(tag + " ")]


def banners(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("running on ")]


def dry(monkeypatch, capsys, fn, argv, cuda=0, ds=True) -> list[str]:
    monkeypatch.setattr(launch, "_cuda_count", lambda: cuda)
    monkeypatch.setattr(launch, "_deepspeed_importable", lambda: ds)
    with pytest.raises(SystemExit) as exc:
        fn(argv)
    assert exc.value.code == 0
    return shlex.split(capsys.readouterr().out.strip())


# -- real runs ------------------------------------------------------------------------------------------------
def test_python_branch_passes_args_and_exit_code():
    p = run_launcher("smart_train", EXIT, *TRICKY, "3")
    assert p.returncode == 3, p.stderr
    (line,) = argv_lines(p.stdout)
    assert line["argv"] == TRICKY + ["3"] and line["rank"] is None


def test_python_branch_success_exit_code():
    p = run_launcher("smart_train", EXIT, "0")
    assert p.returncode == 0, p.stderr


@pytest.mark.distributed
def test_torchrun_branch_passes_args_and_worker_exit_code():
    p = run_launcher("smart_train", "--nproc", "2", EXIT, *TRICKY, "3")
    assert p.returncode == 3, p.stdout + p.stderr  # torchrun alone would say 1
    lines = argv_lines(p.stdout)
    assert sorted(x["rank"] for x in lines) == ["0", "1"] and {x["world_size"] for x in lines} == {"2"}
    assert all(x["argv"] == TRICKY + ["3"] for x in lines)
    assert {x["backend"] for x in lines} == {None}   # smart_train leaves the backend to the script's ds_config


@pytest.mark.distributed
def test_ddp_train_success():
    p = run_launcher("ddp_train", "--nproc", "2", EXIT, "0")
    assert p.returncode == 0, p.stdout + p.stderr
    lines = argv_lines(p.stdout)
    assert len(lines) == 2 and {x["backend"] for x in lines} == {"ddp"}   # DDP even with a default ds_config


@pytest.mark.distributed
def test_ddp_train_strict_script_and_banner():
    p = run_launcher("ddp_train", "--nproc", "2", STRICT, "--foo", "1", "--name", "a b", "--backend")
    assert p.returncode == 0, p.stdout + p.stderr
    lines = argv_lines(p.stdout, "ARGS_JSON")
    assert sorted(x["env"]["RANK"] for x in lines) == ["0", "1"]
    assert all(x["args"] == {"foo": 1, "name": "a b", "backend": True} for x in lines)
    assert banners(p.stdout + p.stderr) == ["running on 2 ranks (backend ddp/gloo, fp32, cpu)"]  # rank 0, once


@pytest.mark.distributed
def test_ds_train_passes_script_arguments_untouched():
    """DeepSpeed's runner would append --local_rank=N, which a strict argparse script rejects (exit 2)."""
    p = run_launcher("ds_train", "--nproc", "2", STRICT, "--foo", "1", "--name", "x;y", timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = argv_lines(p.stdout, "ARGS_JSON")
    assert len(lines) == 2
    assert all(x["args"] == {"foo": 1, "name": "x;y", "backend": False} for x in lines)
    assert sorted((x["env"]["RANK"], x["env"]["LOCAL_RANK"]) for x in lines) == [("0", "0"), ("1", "1")]
    assert {x["env"]["WORLD_SIZE"] for x in lines} == {"2"} and {x["env"]["LLM_TRAINER_BACKEND"] for x in lines} == {
        "deepspeed"}   # the banner of a ds_train run: test_ds_train_runs_the_pretrain_example


@pytest.mark.distributed
@pytest.mark.slow
def test_ds_train_runs_the_pretrain_example(tmp_path):
    """``ds_train --nproc 2 example/pretrain.py --zero 2`` as the example's docstring says (tiny settings)."""
    out = tmp_path / "run"
    p = run_launcher("ds_train", "--nproc", "2", os.path.join(ROOT, "example", "pretrain.py"), "--zero", "2",
                     "--out", str(out), "--steps", "2", "--hidden", "32", "--layers", "2", "--batch-size", "4",
                     "--block-size", "32", timeout=480)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    assert banners(p.stdout + p.stderr) == ["running on 2 ranks (backend deepspeed ZeRO-2, fp32, cpu)"]
    assert (out / "final" / "model.safetensors").is_file() and (out / "ds_config.json").is_file()
    zero = json.loads((out / "ds_config.json").read_text())["zero_optimization"]
    assert zero["stage"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("step") == 2 for r in records)


def test_launcher_backend_choice_reaches_get_backend(monkeypatch):
    from llm_trainer.parallel import DsConfig, SingleBackend, get_backend
    from llm_trainer.parallel.env import DistEnv
    monkeypatch.setenv("LLM_TRAINER_BACKEND", "single")
    env = DistEnv(rank=0, world_size=2, local_rank=0, local_world_size=2, master_addr="127.0.0.1", master_port=1)
    assert isinstance(get_backend(DsConfig(), "fp32", env=env), SingleBackend)
    monkeypatch.setenv("LLM_TRAINER_BACKEND", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        get_backend(DsConfig(), "fp32", env=env)


def test_bad_launcher_option_is_a_usage_error():
    p = run_launcher("smart_train", "--nproc", "0", EXIT, "0")
    assert p.returncode == 2 and "--nproc" in p.stderr
    p = run_launcher("smart_train")
    assert p.returncode == 2


# -- dry runs, one per branch ---------------------------------------------------------------------------------
def test_dry_run_python_branch(monkeypatch, capsys):
    cmd = dry(monkeypatch, capsys, launch.smart_train, ["--dry-run", "train.py", "--x", "a b"])
    assert cmd == [sys.executable, "train.py", "--x", "a b"]


def test_dry_run_python_module(monkeypatch, capsys):
    cmd = dry(monkeypatch, capsys, launch.smart_train, ["--dry-run", "-m", "pkg.train", "--x"])
    assert cmd == [sys.executable, "-m", "pkg.train", "--x"]


def test_dry_run_torchrun_branch(monkeypatch, capsys):
    cmd = dry(monkeypatch, capsys, launch.smart_train, ["--nproc", "2", "--dry-run", "train.py", "--dry-run"])
    assert cmd == [sys.executable, "-m", "llm_trainer.cli.launch", "--nproc-per-node=2", "--nnodes=1",
                   "train.py", "--dry-run"]  # the script's own --dry-run is passed through


def test_dry_run_torchrun_multinode(monkeypatch, capsys):
    cmd = dry(monkeypatch, capsys, launch.smart_train,
              ["--nnodes", "2", "--node-rank", "1", "--master-addr", "10.1.2.3", "--master-port", "29555",
               "--dry-run", "train.py"], ds=False)
    assert cmd == [sys.executable, "-m", "llm_trainer.cli.launch", "--nproc-per-node=1", "--nnodes=2",
                   "--node-rank=1", "--master-addr=10.1.2.3", "--master-port=29555", "train.py"]


def test_dry_run_deepspeed_branch_with_accelerators(monkeypatch, capsys):
    cmd = dry(monkeypatch, capsys, launch.smart_train,
              ["--nproc", "4", "--dry-run", "train.py", "--cfg", "x.toml"], cuda=4)
    port = [a for a in cmd if a.startswith("--master_port=")]
    assert len(port) == 1 and 0 < int(port[0].split("=")[1]) < 65536   # one node: a free port, not 29500
    assert [a for a in cmd if a not in port] == [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus=4",
                                                 "--no_local_rank", "train.py", "--cfg", "x.toml"]


def test_dry_run_deepspeed_hostfile_multinode(monkeypatch, capsys):
    cmd = dry(monkeypatch, capsys, launch.smart_train,
              ["--hostfile", "hosts", "--nnodes", "2", "--master-addr", "n0", "--master-port", "29600",
               "--dry-run", "train.py"], cuda=0)
    assert cmd == [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile=hosts", "--num_nodes=2",
                   "--master_addr=n0", "--master_port=29600", "--no_local_rank", "train.py"]


def test_no_accelerator_or_no_deepspeed_falls_back(monkeypatch, capsys):
    cmd = dry(monkeypatch, capsys, launch.smart_train, ["--nproc", "2", "--dry-run", "t.py"], cuda=2, ds=False)
    assert cmd[2] == "llm_trainer.cli.launch"  # DeepSpeed missing -> torchrun
    cmd = dry(monkeypatch, capsys, launch.smart_train, ["--dry-run", "t.py"], cuda=0, ds=True)
    assert cmd == [sys.executable, "t.py"]  # CPU, one process -> python


def test_dry_run_ds_train(monkeypatch, capsys):
    cmd = dry(monkeypatch, capsys, launch.ds_train,
              ["--nnodes", "2", "--node-rank", "0", "--nproc", "1", "--dry-run", "t.py", "a"], cuda=0)
    assert cmd == [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus=1", "--num_nodes=2",
                   "--node_rank=0", "--no_ssh", "--no_local_rank", "t.py", "a"]  # nodes agree on the default port


def test_dry_run_ddp_train_defaults(monkeypatch, capsys):
    cmd = dry(monkeypatch, capsys, launch.ddp_train, ["--dry-run", "t.py"], cuda=0)
    assert cmd[3:5] == ["--nproc-per-node=1", "--nnodes=1"]  # CPU-only: one process unless asked
    cmd = dry(monkeypatch, capsys, launch.ddp_train, ["--dry-run", "t.py"], cuda=8)
    assert cmd[3] == "--nproc-per-node=8"  # default: one process per GPU


def test_node_rank_must_be_below_nnodes(monkeypatch, capsys):
    monkeypatch.setattr(launch, "_cuda_count", lambda: 0)
    with pytest.raises(SystemExit) as exc:
        launch.smart_train(["--nnodes", "2", "--node-rank", "2", "t.py"])
    assert exc.value.code == 2
