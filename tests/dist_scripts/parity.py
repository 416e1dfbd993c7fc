"""Run under ``torchrun --nproc-per-node=2``: many backend scenarios in one process group, results to JSON.

    torchrun --nproc-per-node=2 tests/dist_scripts/parity.py OUT.json WORKDIR [scenario ...]

For every scenario rank 0 records the max |param - reference| (reference = one fp32 process on the same global
batch, see common.reference_run), how far training moved the weights, and the grad norms of both.
"""
from __future__ import annotations

import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from dist_common import (MICRO, TinyLM, greedy, init_state, make_optimizer, max_diff, reference_run,  # noqa: E402
                    rel_update_error, train_steps, write_json)
from llm_trainer.parallel import (DsConfig, DsZero0Config, DsZero1Config, DsZero2Config,  # noqa: E402
                                  DsZero3Config, get_backend)

STEPS, GA, CLIP = 3, 3, 0.8  # clip 0.8: the first steps clip (norms ~0.84), the last does not
SMALL = dict(reduce_bucket_size=50_000, allgather_bucket_size=50_000)  # default 5e8 would allocate GBs on CPU
PROMPT = [3, 17, 42]


def ds_config(stage: int, clip: float | None = CLIP, acc32: bool = False) -> DsConfig:
    if stage == 3:
        zero = DsZero3Config(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=10_000,
                             sub_group_size=100_000, **SMALL)
    else:
        zero = {0: DsZero0Config, 1: DsZero1Config, 2: DsZero2Config}[stage](**SMALL)
    return DsConfig(zero_config=zero, gradient_clipping=clip, steps_per_print=10**9,
                    grad_accum_dtype="fp32" if acc32 else None)


def make_backend(kind: str, dtype: str, workdir: str, tag: str):
    if kind == "ddp":
        return get_backend(None, dtype, kind="ddp"), None
    stage = int(kind[1])
    cfg = ds_config(stage, acc32=kind.endswith("acc32"))
    return get_backend(cfg, dtype, kind="deepspeed", run_dir=os.path.join(workdir, tag)), stage


def build(backend, stage, optim: str, start: dict):
    """Construct (ZeRO-3: partitioned), load the shared initial weights, wrap with a client optimizer."""
    with backend.model_init_context():
        model = TinyLM()
    if stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            model.load_state_dict(start)
    else:
        model.load_state_dict(start)
    opt = make_optimizer(optim, model.parameters())
    return backend.wrap(model, opt, micro_batch_size=MICRO, grad_accum=GA, grad_clip=CLIP)


def scenario_parity(kind: str, dtype: str, optim: str, workdir: str, tag: str) -> dict:
    backend, stage = make_backend(kind, dtype, workdir, tag)
    model = build(backend, stage, optim, init_state())
    extra: dict = {}

    def on_step(step: int) -> None:  # ZeRO-3: generate from the gathered model in the middle of training
        if stage != 3 or step != 0:
            return
        with backend.gathered_for_generation() as plain:
            assert not isinstance(plain, torch.nn.parallel.DistributedDataParallel)
            extra["gen_inside"] = greedy(plain, PROMPT, 6)
            gathered = {k: v.detach().float().clone() for k, v in plain.state_dict().items()}
        ref1, _ = reference_run(backend.world_size, 1, GA, optim, CLIP)
        extra["gathered_vs_ref_step1"] = max_diff(gathered, ref1)
        outside = TinyLM()
        outside.load_state_dict(ref1)
        extra["gen_reference"] = greedy(outside, PROMPT, 6)
        mine = TinyLM()
        mine.load_state_dict(gathered)
        extra["gen_outside_gathered"] = greedy(mine, PROMPT, 6)

    norms = train_steps(backend, model, STEPS, GA, CLIP, on_step=on_step)
    final = backend.full_state_dict()
    master = backend.full_state_dict(fp32_master=True) if kind != "ddp" else final
    if stage == 3:  # the export must equal what the gathered module holds
        with backend.gathered_for_generation() as plain:
            gathered = {k: v.detach().to("cpu", copy=True) for k, v in plain.state_dict().items()}
        if backend.is_main:
            extra["export_vs_gathered"] = max_diff(final, gathered)
    out = {}
    if backend.is_main:
        ref, ref_norms = reference_run(backend.world_size, STEPS, GA, optim, CLIP)
        # bf16 engines start from bf16-rounded weights; this reference starts there too, isolating the error
        # of bf16 training itself from the one-off rounding of the initial weights.
        rounded = {k: v.to(torch.bfloat16).float() for k, v in init_state().items()}
        ref_r, _ = reference_run(backend.world_size, STEPS, GA, optim, CLIP, start_state=rounded)
        out = {"diff": max_diff(final, ref), "diff_master": max_diff(master, ref),
               "rel_master_rounded_init": rel_update_error(master, ref_r, rounded),
               "rel": rel_update_error(final, ref, init_state()),
               "rel_master": rel_update_error(master, ref, init_state()),
               "moved": max_diff(ref, init_state()), "norms": norms, "ref_norms": ref_norms,
               "dtypes": sorted({str(v.dtype) for v in final.values()}), **extra}
        if kind != "ddp":
            out["ds_config_written"] = os.path.isfile(os.path.join(workdir, tag, "ds_config.json"))
    backend.barrier()
    return out


def scenario_resume(kind: str, dtype: str, optim: str, workdir: str, tag: str) -> dict:
    """4 steps straight vs 2 steps, save, fresh model/optimizer/backend, load, 2 more steps."""
    backend, stage = make_backend(kind, dtype, workdir, tag + "-a")
    model = build(backend, stage, optim, init_state())
    train_steps(backend, model, 4, GA, CLIP)
    straight = backend.full_state_dict(fp32_master=kind != "ddp")

    backend, stage = make_backend(kind, dtype, workdir, tag + "-b")
    model = build(backend, stage, optim, init_state())
    train_steps(backend, model, 2, GA, CLIP)
    ckpt = os.path.join(workdir, tag + "-ckpt")
    backend.save(ckpt, {"step": 2, "note": tag})
    before = backend.full_state_dict(fp32_master=kind != "ddp")

    backend, stage = make_backend(kind, dtype, workdir, tag + "-c")
    torch.manual_seed(999)  # a different init: the checkpoint must overwrite it
    model = build(backend, stage, optim, TinyLM().state_dict())
    client = backend.load(ckpt)
    after_load = backend.full_state_dict(fp32_master=kind != "ddp")
    train_steps(backend, model, 2, GA, CLIP, first_step=client["step"])
    resumed = backend.full_state_dict(fp32_master=kind != "ddp")
    out = {}
    if backend.is_main:
        ref, _ = reference_run(backend.world_size, 4, GA, optim, CLIP)
        out = {"client_state": client, "load_roundtrip": max_diff(after_load, before),
               "resumed_vs_straight": max_diff(resumed, straight), "resumed_vs_ref": max_diff(resumed, ref)}
    # loading from an empty folder must raise, not be swallowed
    try:
        backend.load(os.path.join(workdir, tag + "-nothing"))
        out["missing_raises"] = False
    except FileNotFoundError:
        out["missing_raises"] = True
    backend.barrier()
    return out


SCENARIOS = {}
for _kind in ("ddp", "z0", "z1", "z2", "z3"):
    for _opt in ("sgd", "adamw"):
        SCENARIOS[f"{_kind}-fp32-{_opt}"] = (scenario_parity, _kind, "fp32", _opt)
    for _opt in ("sgd", "adamw"):
        SCENARIOS[f"{_kind}-bf16-{_opt}"] = (scenario_parity, _kind, "bf16", _opt)
for _kind in ("z1acc32", "z2acc32", "z3acc32"):
    SCENARIOS[f"{_kind}-bf16-sgd"] = (scenario_parity, _kind, "bf16", "sgd")
SCENARIOS["z2-fp32-lion"] = (scenario_parity, "z2", "fp32", "lion")
for _kind in ("ddp", "z2", "z3"):
    SCENARIOS[f"resume-{_kind}"] = (scenario_resume, _kind, "fp32", "adamw")


def main() -> None:
    out_path, workdir, *names = sys.argv[1:]
    names = names or list(SCENARIOS)
    results = {}
    rank = int(os.environ.get("RANK", "0"))
    for name in names:
        fn, kind, dtype, optim = SCENARIOS[name]
        t0 = time.perf_counter()
        try:
            res = fn(kind, dtype, optim, workdir, name)
        except Exception:
            res = {"error": traceback.format_exc()}
            print(f"[rank {rank}] scenario {name} failed:\n{res['error']}", file=sys.stderr, flush=True)
        res["seconds"] = round(time.perf_counter() - t0, 2)
        results[name] = res
        if rank == 0:
            write_json(out_path, results)
    if rank == 0:
        write_json(out_path, results)


if __name__ == "__main__":
    main()
