"""One of two "nodes" (each a torchrun with --nnodes=2 --nproc-per-node=1 on loopback): DDP and ZeRO-2 train
together and must match the single-process reference on the same global batch. Rank 0 writes OUT.json."""
from __future__ import annotations

import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_common import (MICRO, TinyLM, init_state, make_optimizer, max_diff, reference_run,  # noqa: E402
                    train_steps, write_json)
from llm_trainer.parallel import DsConfig, DsZero2Config, get_backend  # noqa: E402

STEPS, GA, CLIP = 2, 2, 0.8


def run(kind: str):
    if kind == "ddp":
        backend = get_backend(None, "fp32")
    else:
        zero = DsZero2Config(reduce_bucket_size=50_000, allgather_bucket_size=50_000)
        backend = get_backend(DsConfig(zero_config=zero, gradient_clipping=CLIP, steps_per_print=10**9), "fp32")
    model = TinyLM()
    model.load_state_dict(init_state())
    model = backend.wrap(model, make_optimizer("adamw", model.parameters()), micro_batch_size=MICRO,
                         grad_accum=GA, grad_clip=CLIP)
    train_steps(backend, model, STEPS, GA, CLIP)
    return backend, backend.full_state_dict(fp32_master=True)


def main() -> None:
    out_path = sys.argv[1]
    results = {}
    for kind in ("ddp", "deepspeed"):
        backend, final = run(kind)
        who = backend.all_gather_object({"rank": backend.rank, "local_rank": backend.local_rank,
                                         "local_world_size": backend.env.local_world_size,
                                         "pid": os.getpid(), "host": socket.gethostname()})
        if backend.is_main:
            ref, _ = reference_run(backend.world_size, STEPS, GA, "adamw", CLIP)
            results[kind] = {"backend": backend.name, "world_size": backend.world_size, "ranks": who,
                             "diff": max_diff(final, ref)}
    if results:
        write_json(out_path, results)


if __name__ == "__main__":
    main()
