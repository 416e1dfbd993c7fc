"""Run under ``torchrun --nproc-per-node=2``: the real ``Trainer`` (pretraining) under DDP, ZeRO-2 and ZeRO-3,
plus an interrupted-and-resumed run under DDP and ZeRO-3, all in one process group; rank 0 writes a JSON.

    torchrun --nproc-per-node=2 tests/dist_scripts/trainer_parity.py OUT.json WORKDIR

WORKDIR must hold ``init/`` (an HF-format LlmModel folder every run starts from) and ``tokens.npy``. Each scenario
trains in ``WORKDIR/<scenario>/`` and exports ``final/``; the test compares those folders with a single process
(batch_size × 2, the same global batch; see tests/test_trainer_distributed.py).
"""
from __future__ import annotations

import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from dist_common import write_json  # noqa: E402

STEPS, STOP, MICRO_PER_RANK, GA, BLOCK = 4, 2, 2, 2, 16
SMALL = dict(reduce_bucket_size=50_000, allgather_bucket_size=50_000)


def ds_config(stage: int):
    from llm_trainer.parallel import DsConfig, DsZero2Config, DsZero3Config
    if stage == 3:
        zero = DsZero3Config(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=10_000,
                             sub_group_size=100_000, **SMALL)
    else:
        zero = DsZero2Config(**SMALL)
    return DsConfig(zero_config=zero, steps_per_print=10**9)


def config(workdir: str, name: str, batch_size: int, ds, **overrides):
    """fp32, AdamW with weight decay 0.1 (so the ZeRO-3 decay groups matter), warmup + cosine, clipping on,
    shuffled data, accumulation 2."""
    from llm_trainer import OptimConfig, PretrainConfig, TrainConfig
    kw = dict(init_weights_path=os.path.join(workdir, "init"), file_dataset=[os.path.join(workdir, "tokens.npy")],
              dataset_block_size=BLOCK, batch_size=batch_size, output_dir=os.path.join(workdir, name),
              dtype="fp32", ds_config=ds, max_steps=STEPS, save_interval=None, eval_interval=None, log_interval=1,
              max_grad_norm=0.5, seed=11,
              optim_config=OptimConfig(optim_type="adam", initial_lr=1e-3, max_lr=3e-3, min_lr=3e-4, warmup_iters=1,
                                       weight_decay=0.1, enable_lr_scheduler=True),
              pretrain_config=PretrainConfig(gradient_accumulation_steps=GA))
    kw.update(overrides)
    return TrainConfig(**kw)


class Interrupted(Exception):
    pass


def stopping_trainer():
    from llm_trainer import Trainer

    class StopAfter(Trainer):
        """A crash right after the checkpoint of step STOP was committed (every rank raises together)."""

        def save_checkpoint(self):
            path = super().save_checkpoint()
            if self.global_step == STOP:
                raise Interrupted
            return path

    return StopAfter


def straight(workdir: str, name: str, ds) -> dict:
    from llm_trainer import Trainer
    tr = Trainer(train_config=config(workdir, name, MICRO_PER_RANK, ds))
    last = tr.train()
    return {"backend": tr.backend.name, "world": tr.backend.world_size, "steps": tr.global_step,
            "loss": float(last.get("loss", float("nan"))), "tokens_per_step": float(last.get("tokens_per_step", 0)),
            "decay_names": _decay_names(tr)}


def _decay_names(tr) -> list[str]:
    """Parameter names in the optimizer's weight-decay group (DeepSpeed swaps the group's tensors for flat
    partitions but keeps the group's ``names``): a ZeRO-3 run must decay the same parameters as one process."""
    return sorted(n for g in tr.optimizer.param_groups if g.get("group_name") == "decay" for n in g["names"])


def resumed(workdir: str, name: str, ds) -> dict:
    """STOP steps with a checkpoint every STOP steps, crash, then a new Trainer with resume_from='auto'."""
    from llm_trainer import Trainer
    cfg = config(workdir, name, MICRO_PER_RANK, ds, save_interval=STOP, resume_from="auto")
    try:
        stopping_trainer()(train_config=cfg).train()
        raise RuntimeError("the interrupted run did not stop")
    except Interrupted:
        pass
    tr = Trainer(train_config=cfg)
    info = {"resumed_at": tr.global_step, "epoch_position": tr.epoch_position}
    tr.train()
    info.update(backend=tr.backend.name, world=tr.backend.world_size, steps=tr.global_step)
    return info


def main(out: str, workdir: str) -> None:
    import torch.distributed as dist
    rank = int(os.environ["RANK"])
    scenarios = [("ddp", straight, None), ("ddp_resume", resumed, None),
                 ("z2", straight, ds_config(2)), ("z3", straight, ds_config(3)),
                 ("z3_resume", resumed, ds_config(3))]
    results = {}
    for name, fn, ds in scenarios:
        try:
            results[name] = fn(workdir, name, ds)
        except Exception as e:  # noqa: BLE001 - reported to the test
            results[name] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"}
        if dist.is_initialized():
            dist.barrier()
    if rank == 0:
        write_json(out, results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
