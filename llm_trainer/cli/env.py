"""``llm-trainer env``: the versions, hardware and environment variables that matter, as a block to paste into a bug
report (``--json`` for a machine-readable dict).

Versions are read from the installed packages' metadata (nothing heavy is imported but torch). Environment
variables are those that change how training runs (threads, visible devices, launcher and rendezvous, NCCL/gloo,
DeepSpeed, torch, W&B); any whose name suggests a secret (KEY, TOKEN, SECRET, PASSWORD, CREDENTIAL) is left out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("llm_trainer", "torch", "deepspeed", "tokenizers", "safetensors", "numpy", "transformers", "trl",
            "peft", "accelerate", "flash-attn", "tensorboard", "wandb", "pyyaml", "jinja2")
ENV_PREFIXES = ("CUDA_", "NCCL_", "GLOO_", "TORCH_", "PYTORCH_", "DS_", "DEEPSPEED_", "LLM_TRAINER_", "OMP_", "MKL_",
                "HIP_", "ROCR_", "ROCM_", "WANDB_", "TOKENIZERS_")
ENV_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "OPENBLAS_NUM_THREADS", "HF_HOME")
SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def _memory_gib() -> str:
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    return "unknown"


def relevant_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment variables that change how training runs, secrets left out."""
    environ = dict(os.environ if environ is None else environ)
    return {k: environ[k] for k in sorted(environ)
            if (k.startswith(ENV_PREFIXES) or k in ENV_NAMES) and not any(m in k.upper() for m in SECRET_MARKERS)}


def _accelerators(torch: Any) -> list[str]:
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(f"{i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}")
    return out


def collect_env() -> dict[str, Any]:
    """Everything ``llm-trainer env`` reports, as plain data."""
    import torch
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})",
        "packages": {p: _version(p) for p in PACKAGES},
        "llm_trainer_path": str(Path(__file__).resolve().parents[1]),
        "torch_cuda": torch.version.cuda or "none",
        "torch_rocm": getattr(torch.version, "hip", None) or "none",
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "none",
        "accelerators": _accelerators(torch),
        "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "memory": _memory_gib(),
        "env": relevant_env(),
    }
    return info


def format_env(info: dict[str, Any]) -> str:
    """The report as a Markdown block (fenced, so it pastes cleanly into an issue)."""
    pk = info["packages"]
    lines = ["```", "llm_trainer environment",
             f"- llm_trainer: {pk['llm_trainer']} ({info['llm_trainer_path']})",
             f"- platform: {info['platform']}",
             f"- python: {info['python']}",
             f"- torch: {pk['torch']} (CUDA {info['torch_cuda']}, ROCm {info['torch_rocm']}, cuDNN {info['cudnn']}, "
             f"NCCL {info['nccl']})"]
    lines += [f"- {p}: {v}" for p, v in pk.items() if p not in ("llm_trainer", "torch")]
    accel = info["accelerators"] or [f"none ({'MPS' if info['mps'] else 'CPU only'})"]
    lines.append("- accelerators: " + accel[0])
    lines += [f"  {a}" for a in accel[1:]]
    lines += [f"- cpu: {info['cpu']}",
              f"- cpu cores: {info['cpu_count']} (usable by this process: {info['cpu_affinity']})",
              f"- torch threads: {info['torch_threads']} (inter-op: {info['torch_interop_threads']})",
              f"- memory: {info['memory']}",
              "- environment variables:" + ("" if info["env"] else " none set")]
    lines += [f"  {k}={v}" for k, v in info["env"].items()]
    lines.append("```")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("env", help="print versions, hardware and environment variables for a bug report")
    p.add_argument("--json", action="store_true", help="print a JSON object instead")


def run_env(as_json: bool = False) -> int:
    info = collect_env()
    print(json.dumps(info, indent=2) if as_json else format_env(info), flush=True)
    return 0
