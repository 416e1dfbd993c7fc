"""``llm-trainer env``: run as a real process with a known environment; the report's versions, threads, accelerator
and variables match what that process has, and secrets are never printed."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_scripts"))
from runner import ROOT, subprocess_env  # noqa: E402

from llm_trainer.cli.env import cpu_model, relevant_env  # noqa: E402


def _env_report(*args: str) -> str:
    env = subprocess_env(OMP_NUM_THREADS="1", NCCL_DEBUG="INFO", WANDB_API_KEY="hunter2-secret",
                         HF_TOKEN="hf_secret", CUDA_VISIBLE_DEVICES="", UNRELATED_VARIABLE="x")
    p = subprocess.run([sys.executable, "-c", "import sys; from llm_trainer.cli.main import main; sys.exit(main())",
                        "env", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_env_report_is_a_pasteable_block_of_facts():
    text = _env_report()
    lines = text.strip().splitlines()
    assert lines[0] == "```" and lines[-1] == "```"
    assert f"- python: {platform.python_version()} (" in text
    assert f"- torch: {torch.__version__} (CUDA {torch.version.cuda or 'none'}" in text
    for package in ("deepspeed", "tokenizers", "safetensors", "transformers", "trl"):
        assert f"- {package}: {metadata.version(package)}" in lines
    assert "- torch threads: 1 (" in text                              # OMP_NUM_THREADS=1 reached torch
    assert f"- cpu: {cpu_model()}" in lines
    assert f"- cpu cores: {os.cpu_count()} (" in text
    assert "  NCCL_DEBUG=INFO" in lines and "  OMP_NUM_THREADS=1" in lines and "  CUDA_VISIBLE_DEVICES=" in lines
    assert "UNRELATED_VARIABLE" not in text
    assert "secret" not in text and "WANDB_API_KEY" not in text and "HF_TOKEN" not in text
    if not torch.cuda.is_available():
        assert "- accelerators: none (" in text


def test_env_json_has_the_same_facts():
    info = json.loads(_env_report("--json"))
    assert info["packages"]["torch"] == metadata.version("torch")
    assert info["packages"]["llm_trainer"] == metadata.version("llm_trainer")
    assert info["torch_threads"] == 1 and info["env"]["NCCL_DEBUG"] == "INFO"
    assert len(info["accelerators"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    try:
        flash = metadata.version("flash-attn")
    except metadata.PackageNotFoundError:
        flash = "not installed"
    assert info["packages"]["flash-attn"] == flash


def test_relevant_env_filters_by_prefix_and_drops_secrets():
    env = {"TORCH_EXTENSIONS_DIR": "/x", "DS_ACCELERATOR": "cpu", "WANDB_API_KEY": "k", "GITHUB_TOKEN": "t",
           "NCCL_SOCKET_IFNAME": "eth0", "PATH": "/bin", "MASTER_PORT": "29500", "AWS_SECRET_ACCESS_KEY": "s",
           "LLM_TRAINER_BACKEND": "ddp", "DEEPSPEED_PASSWORD": "p"}
    assert relevant_env(env) == {"DS_ACCELERATOR": "cpu", "LLM_TRAINER_BACKEND": "ddp", "MASTER_PORT": "29500",
                                 "NCCL_SOCKET_IFNAME": "eth0", "TORCH_EXTENSIONS_DIR": "/x"}
