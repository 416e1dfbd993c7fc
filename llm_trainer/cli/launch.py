"""Launchers: ``smart_train``, ``ds_train``, ``ddp_train`` (console scripts).

    smart_train [launcher options] script.py [script arguments...]

Launcher options come BEFORE the script; everything after the script is handed to it untouched (the DeepSpeed
launcher runs with ``--no_local_rank``, so no ``--local_rank=N`` is appended; every worker finds ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` in its environment, whichever launcher started it). The launcher replaces itself
with the chosen command (``os.execv``), so the training script's exit status is the launcher's exit status and
signals reach it directly. ``ds_train`` and ``ddp_train`` also set ``LLM_TRAINER_BACKEND``
(``deepspeed`` / ``ddp``) so the trainers use the backend the user launched with, whatever ``ds_config`` says,
and rank 0 prints ``running on N ranks (backend ...)`` when the backend starts; ``smart_train`` leaves the choice
to the script (DeepSpeed when ``TrainConfig.ds_config`` is set).

``smart_train`` picks:
  1. the DeepSpeed launcher when DeepSpeed imports and accelerators exist (``torch.cuda.is_available()``), or a
     ``--hostfile`` is given;
  2. else ``torch.distributed.run`` (torchrun) when more than one process is wanted (``--nproc > 1`` or
     ``--nnodes > 1``);
  3. else plain ``python script.py``.
``ds_train`` always uses the DeepSpeed launcher, ``ddp_train`` always torchrun (default ``--nproc``: the number of
CUDA devices, or 1 on a CPU-only machine).

torchrun itself reports a failed worker as exit status 1; we run it through this module's ``__main__``
(``python -m llm_trainer.cli.launch <torchrun arguments>``), which exits with the first failed worker's own
status instead (``128 + signal`` for a worker killed by a signal).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass
from typing import NoReturn, Sequence

__all__ = ["smart_train", "ds_train", "ddp_train", "build_command", "LaunchOptions"]

_TORCHRUN_WRAPPER = "llm_trainer.cli.launch"


@dataclass
class LaunchOptions:
    script: str
    script_args: list[str]
    nproc: int | None = None
    nnodes: int = 1
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    hostfile: str | None = None
    module: bool = False
    dry_run: bool = False


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return value


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                usage=f"{prog} [options] script.py [script arguments ...]")
    p.add_argument("--nproc", "--nproc-per-node", "--nproc_per_node", dest="nproc", type=_positive, default=None,
                   help="processes per node (default: 1; ddp_train: number of CUDA devices or 1)")
    p.add_argument("--nnodes", type=_positive, default=1, help="number of nodes (default 1)")
    p.add_argument("--node-rank", "--node_rank", dest="node_rank", type=_non_negative, default=None,
                   help="this node's index in [0, nnodes) for multi-node runs")
    p.add_argument("--master-addr", "--master_addr", dest="master_addr", default=None,
                   help="address of the rank-0 node (multi-node)")
    p.add_argument("--master-port", "--master_port", dest="master_port", type=_port, default=None,
                   help="port of the rank-0 node (default: a free port on one node, 29500 across nodes)")
    p.add_argument("--hostfile", default=None, help="DeepSpeed hostfile (MPI style: 'host slots=N' lines)")
    p.add_argument("-m", "--module", action="store_true", help="treat the script as a module name (python -m)")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the command that would run and exit 0")
    p.add_argument("script", help="training script (or module with -m)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="passed to the script unchanged")
    return p


def parse_launch_args(argv: Sequence[str], prog: str = "smart_train",
                      description: str = "Run a training script on one or many processes.") -> LaunchOptions:
    ns = _parser(prog, description).parse_args(list(argv))
    opts = LaunchOptions(**vars(ns))
    if opts.node_rank is not None and opts.node_rank >= opts.nnodes:
        _parser(prog, description).error(f"--node-rank {opts.node_rank} must be < --nnodes {opts.nnodes}")
    return opts


# -- command builders ---------------------------------------------------------------------------------------------
def _python_command(o: LaunchOptions) -> list[str]:
    head = [sys.executable, "-m", o.script] if o.module else [sys.executable, o.script]
    return head + o.script_args


def _torchrun_command(o: LaunchOptions, nproc: int) -> list[str]:
    cmd = [sys.executable, "-m", _TORCHRUN_WRAPPER, f"--nproc-per-node={nproc}", f"--nnodes={o.nnodes}"]
    if o.nnodes > 1:
        cmd += [f"--node-rank={o.node_rank or 0}", f"--master-addr={o.master_addr or '127.0.0.1'}",
                f"--master-port={o.master_port or 29500}"]
    else:
        if o.master_addr is not None:
            cmd.append(f"--master-addr={o.master_addr}")
        if o.master_port is not None:
            cmd.append(f"--master-port={o.master_port}")
    if o.module:
        cmd.append("--module")
    return cmd + [o.script] + o.script_args


def _deepspeed_command(o: LaunchOptions) -> list[str]:
    """``--no_local_rank``: DeepSpeed's runner would append ``--local_rank=N`` to the script's arguments, which a
    strict argparse script rejects; ``LOCAL_RANK`` is in every worker's environment anyway. One node without
    ``--master-port`` gets a free port (DeepSpeed's default, 29500, collides between concurrent jobs)."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if o.hostfile is not None:
        cmd.append(f"--hostfile={o.hostfile}")
    if o.nproc is not None:
        cmd.append(f"--num_gpus={o.nproc}")
    multi_node = o.nnodes > 1 or o.hostfile is not None
    if multi_node:
        cmd.append(f"--num_nodes={o.nnodes}" if o.nnodes > 1 else "--num_nodes=-1")
    if o.node_rank is not None:  # each node started by hand, as with torchrun
        cmd += [f"--node_rank={o.node_rank}", "--no_ssh"]
    if o.master_addr is not None:
        cmd.append(f"--master_addr={o.master_addr}")
    if o.master_port is not None:
        cmd.append(f"--master_port={o.master_port}")
    elif not multi_node:
        from llm_trainer.parallel.env import find_free_port
        cmd.append(f"--master_port={find_free_port()}")
    cmd.append("--no_local_rank")
    if o.module:
        cmd.append("--module")
    return cmd + [o.script] + o.script_args


def _deepspeed_importable() -> bool:
    """Is DeepSpeed installed? (find_spec: importing it would cost seconds of start-up for nothing.)"""
    import importlib.util
    return importlib.util.find_spec("deepspeed") is not None


def _cuda_count() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def build_command(kind: str, opts: LaunchOptions) -> list[str]:
    """The argv for ``kind`` in 'smart' | 'deepspeed' | 'torchrun' | 'python'."""
    if kind == "smart":
        if (opts.hostfile is not None or _cuda_count() > 0) and _deepspeed_importable():
            kind = "deepspeed"
        elif (opts.nproc or 1) > 1 or opts.nnodes > 1:
            kind = "torchrun"
        else:
            kind = "python"
    if kind == "deepspeed":
        return _deepspeed_command(opts)
    if kind == "torchrun":
        return _torchrun_command(opts, opts.nproc or max(1, _cuda_count()))
    if kind == "python":
        if opts.hostfile is not None:
            raise SystemExit("--hostfile needs the DeepSpeed launcher (DeepSpeed is not importable)")
        return _python_command(opts)
    raise ValueError(f"unknown launcher kind {kind!r}")


def _exec(cmd: list[str], dry_run: bool) -> NoReturn:
    if dry_run:
        print(shlex.join(cmd), flush=True)
        raise SystemExit(0)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)  # cmd[0] is an absolute interpreter path; exec never returns on success


BACKEND_ENV = "LLM_TRAINER_BACKEND"   # read by llm_trainer.parallel.env.launcher_backend (not imported: no torch)
_FORCED_BACKEND = {"deepspeed": "deepspeed", "torchrun": "ddp"}


def _main(kind: str, prog: str, description: str, argv: Sequence[str] | None) -> NoReturn:
    opts = parse_launch_args(sys.argv[1:] if argv is None else argv, prog, description)
    if kind in _FORCED_BACKEND and not opts.dry_run:
        os.environ[BACKEND_ENV] = _FORCED_BACKEND[kind]   # inherited through exec by every worker
    _exec(build_command(kind, opts), opts.dry_run)


def smart_train(argv: Sequence[str] | None = None) -> NoReturn:
    """DeepSpeed launcher with accelerators, torchrun for several processes, else plain python."""
    _main("smart", "smart_train", "Run a training script with the launcher this machine needs.", argv)


def ds_train(argv: Sequence[str] | None = None) -> NoReturn:
    """Always the DeepSpeed launcher (``python -m deepspeed.launcher.runner``)."""
    _main("deepspeed", "ds_train", "Run a training script under the DeepSpeed launcher.", argv)


def ddp_train(argv: Sequence[str] | None = None) -> NoReturn:
    """Always torchrun; ``--nproc`` defaults to the CUDA device count (1 on CPU-only machines)."""
    _main("torchrun", "ddp_train", "Run a training script under torchrun (torch DDP).", argv)


# -- torchrun with the worker's exit status --------------------------------------------------------------------
def _split_at_script(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Wrapper argv = torchrun options in ``--opt=value`` / flag form, then the script, then its arguments."""
    for i, arg in enumerate(argv):
        if not arg.startswith("-"):
            return list(argv[:i + 1]), list(argv[i + 1:])
    return list(argv), []


def _torchrun_main(argv: Sequence[str]) -> NoReturn:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun's own parser classifies every token, so a script option that abbreviates one of torchrun's
    # (e.g. the script's ``--nproc``) is an "ambiguous option" error; parse only torchrun's part.
    head, script_args = _split_at_script(argv)
    args = parse_args(head)
    args.training_script_args = script_args
    try:
        run(args)
    except ChildFailedError as err:
        _, failure = err.get_first_failure()
        code = failure.exitcode
        raise SystemExit(128 - code if code < 0 else (code if 0 < code < 256 else 1)) from None
    raise SystemExit(0)


if __name__ == "__main__":
    _torchrun_main(sys.argv[1:])
