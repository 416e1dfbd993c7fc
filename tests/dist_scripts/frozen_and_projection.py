"""Run under ``torchrun --nproc-per-node=2``: the Backend's frozen replicas, output projection and ZeRO-3 'auto'
sizes on a tiny LlmModel, against single-process references. Rank 0 writes the results to JSON.

    torchrun --nproc-per-node=2 tests/dist_scripts/frozen_and_projection.py OUT.json WORKDIR [scenario ...]

Scenarios (kinds: ddp, z2 = ZeRO-2, z3 = ZeRO-3; fp32 unless named bf16):
* ``projection-<kind>-<tied|untied>``: the same 2 steps (2 micro-batches each, SGD) once with full logits and once
  with token log-probs from ``output_projection`` in chunks of 3 valid tokens under activation checkpointing. The
  ranks project different numbers of chunks, and rank 1 has one micro-batch without any trained token (it projects
  an empty chunk); also compared with one process on the whole global batch.
* ``frozen-<kind>[-bf16]``: ``frozen_replica(source=)`` of the trained model (equal outputs, frozen, unchanged
  by further training) and ``frozen_replica(build=)`` of a teacher loaded from an HF folder with
  ``trainers.setup.load_weights``, used for one distillation step against a single-process reference.
* ``auto-z3[-init-hidden]``: the default ZeRO-3 'auto' sizes resolve from the hidden size (32): persistence 320,
  prefetch 921, reduce bucket 1024, and the large parameters are really partitioned; ``auto-z3-unresolved``: a
  model without a hidden size is refused unless ``wrap(hidden_size=)`` is given.
"""
from __future__ import annotations

import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from common import max_diff, rel_update_error, train_steps, write_json  # noqa: E402
from llm_trainer.model import LlmModel, ModelConfig  # noqa: E402
from llm_trainer.parallel import DsConfig, DsZero2Config, DsZero3Config, get_backend  # noqa: E402

VOCAB, HIDDEN, SEQ, MICRO, GA, STEPS, CHUNK, LR = 64, 32, 10, 2, 2, 2, 3, 0.5
SMALL = dict(reduce_bucket_size=50_000, allgather_bucket_size=50_000)


def model_config(tied: bool) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=tied)


def initial_state(cfg: ModelConfig, seed: int = 1234) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in LlmModel(cfg).state_dict().items()}


def batch(step: int, micro: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths per rank; rank 1's second micro-batch of step 0 trains no token at all."""
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    ids = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=g)
    labels = ids[:, 1:].clone()
    for row in range(MICRO):
        labels[row, 2 + (5 * rank + 3 * micro + row + step) % (SEQ - 2):] = -100
    if rank == 1 and micro == 1 and step == 0:
        labels[:] = -100
    return ids[:, :-1].contiguous(), labels


def full_logits_loss(model, ids, labels):
    logits = model(input_ids=ids).logits.float()
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100, reduction="sum"), 0


def chunked_loss_fn(backend):
    def chunk_ce(project, h, y):
        return F.cross_entropy(project(h).float(), y, reduction="sum")

    def loss(model, ids, labels):
        hidden = model(input_ids=ids, return_hidden_states=True).hidden_states
        h, y = hidden.reshape(-1, HIDDEN), labels.reshape(-1)
        keep = (y != -100).nonzero().squeeze(1)
        h, y = h[keep], y[keep]
        with backend.output_projection(backend.unwrap(model)) as project:
            if y.numel() == 0:     # keep the head in this rank's graph (Backend.output_projection's rule)
                return project(h[:0]).sum(), 0
            parts = [checkpoint(chunk_ce, project, h[s:s + CHUNK], y[s:s + CHUNK], use_reentrant=False)
                     for s in range(0, y.numel(), CHUNK)]
        return torch.stack(parts).sum(), 0
    return loss


def ds_config(kind: str, **zero) -> DsConfig:
    if kind.startswith("z3"):
        z = DsZero3Config(**(zero or dict(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=10_000,
                                          sub_group_size=100_000, **SMALL)))
    else:
        z = DsZero2Config(**SMALL)
    return DsConfig(zero_config=z, gradient_clipping=None, steps_per_print=10**9)


def make_backend(kind: str, dtype: str = "fp32", run_dir: str | None = None, **zero):
    if kind == "ddp":
        return get_backend(None, dtype, kind="ddp")
    return get_backend(ds_config(kind, **zero), dtype, kind="deepspeed", run_dir=run_dir)


def build(backend, cfg: ModelConfig, state: dict, **init_kw):
    """Construct in the backend's init context (ZeRO-3: partitioned), load ``state`` (gathered under ZeRO-3)."""
    with backend.model_init_context(**init_kw):
        model = LlmModel(cfg)
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            model.load_state_dict(state)
    else:
        model.load_state_dict(state)
    return model


def wrapped(backend, cfg, state, **init_kw):
    model = build(backend, cfg, state, **init_kw)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    return backend.wrap(model, opt, micro_batch_size=MICRO, grad_accum=GA, grad_clip=None)


def reference_steps(cfg, state, world: int, steps: int, loss_fn=full_logits_loss, teacher=None):
    """One fp32 process, the whole global batch, the same SGD steps."""
    model = LlmModel(cfg)
    model.load_state_dict(state)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(steps):
        batches = [batch(step, m, r, world) for m in range(GA) for r in range(world)]
        total = sum(int((lab != -100).sum()) for _, lab in batches)
        opt.zero_grad(set_to_none=True)
        for ids, lab in batches:
            ls, _ = loss_fn(model, ids, lab) if teacher is None else loss_fn(model, ids, lab, teacher)
            (ls / total).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def scenario_projection(kind: str, tied: bool, workdir: str, tag: str) -> dict:
    cfg = model_config(tied)
    start = initial_state(cfg)
    runs = {}
    for name in ("full", "chunked"):
        backend = make_backend(kind)
        model = wrapped(backend, cfg, start)
        loss_fn = full_logits_loss if name == "full" else chunked_loss_fn(backend)
        losses: list = []
        norms = train_steps(backend, model, STEPS, GA, None, batch_fn=batch, loss_fn=loss_fn, losses=losses)
        runs[name] = (losses, norms, backend.full_state_dict())
    out = {}
    if backend.is_main:
        ref = reference_steps(cfg, start, backend.world_size, STEPS)
        (lf, nf, sf), (lc, nc, sc) = runs["full"], runs["chunked"]
        out = {"loss_full": lf, "loss_chunked": lc, "norm_full": nf, "norm_chunked": nc,
               "weights_chunked_vs_full": max_diff(sc, sf), "weights_chunked_vs_reference": max_diff(sc, ref),
               "moved": max_diff(ref, start)}
    backend.barrier()
    return out


def kd_loss(model, ids, labels, teacher):
    """Forward KL(teacher || student) summed over the trained tokens (what the KD trainer minimises)."""
    logits = model(input_ids=ids).logits.float()
    with torch.no_grad():
        t = teacher(input_ids=ids).logits.float()
    mask = (labels != -100).reshape(-1)
    s_lp = F.log_softmax(logits.reshape(-1, VOCAB)[mask], -1)
    t_lp = F.log_softmax(t.reshape(-1, VOCAB)[mask], -1)
    return (t_lp.exp() * (t_lp - s_lp)).sum(), 0


def param_facts(module) -> dict:
    facts = {"requires_grad": sorted({p.requires_grad for p in module.parameters()}),
             "training": any(m.training for m in module.modules()),
             "dtypes": sorted({str(p.dtype) for p in module.parameters()})}
    big = [p for p in module.parameters() if getattr(p, "ds_numel", 0) > 10 * HIDDEN]
    if big:
        facts["partitioned"] = all(p.ds_tensor.numel() * 2 == p.ds_numel and p.data.numel() == 0 for p in big)
    return facts


def scenario_frozen(kind: str, dtype: str, workdir: str, tag: str) -> dict:
    from llm_trainer.trainers.setup import load_weights, new_model

    cfg, teacher_cfg = model_config(False), model_config(True)
    start = initial_state(cfg)
    teacher_dir = os.path.join(workdir, tag + "-teacher")
    backend = make_backend(kind, dtype)
    if backend.is_main:
        torch.manual_seed(77)
        LlmModel(teacher_cfg).save_pretrained(teacher_dir)
    backend.barrier()
    model = wrapped(backend, cfg, start)
    train_steps(backend, model, 1, GA, None, batch_fn=batch, loss_fn=full_logits_loss)

    probe = batch(5, 0, 0, 1)[0].to(backend.device)
    plain = backend.unwrap(model)
    replica = backend.frozen_replica(source=plain)
    with torch.no_grad(), backend.autocast():
        model.eval()
        trained_logits = model(input_ids=probe).logits.float()
        model.train()
        replica_logits = replica(input_ids=probe).logits.float()
        hidden = replica(input_ids=probe, return_hidden_states=True).hidden_states
        with backend.output_projection(replica) as project:
            chunked = torch.cat([project(hidden[:, s:s + CHUNK]) for s in range(0, hidden.shape[1], CHUNK)], 1)
    out = {"engine": type(replica).__name__, "replica_vs_trained": float((replica_logits - trained_logits).abs().max()),
           "projection_vs_logits": float((chunked.float() - replica_logits).abs().max()),
           "replica": param_facts(getattr(replica, "module", replica))}

    def build_teacher():
        teacher = new_model(teacher_cfg)
        load_weights(teacher, teacher_dir)
        return teacher

    teacher = backend.frozen_replica(build=build_teacher)
    out["teacher"] = param_facts(getattr(teacher, "module", teacher))
    with torch.no_grad():
        plain_teacher = LlmModel.from_pretrained(teacher_dir)
        want = plain_teacher(input_ids=probe.cpu()).logits
        with backend.autocast():
            got = teacher(input_ids=probe).logits.float().cpu()
    out["teacher_vs_plain"] = float((got - want).abs().max()) / float(want.abs().max())

    before = backend.full_state_dict(fp32_master=kind != "ddp")
    train_steps(backend, model, 1, GA, None, first_step=1, batch_fn=batch,
                loss_fn=lambda m, i, lab: kd_loss(m, i, lab, teacher))
    with torch.no_grad(), backend.autocast():
        out["replica_unchanged"] = float((replica(input_ids=probe).logits.float() - replica_logits).abs().max())
    after = backend.full_state_dict(fp32_master=kind != "ddp")
    if backend.is_main:
        ref_state = {k: v.float() for k, v in before.items()}
        ref = reference_kd_step(cfg, ref_state, backend.world_size, plain_teacher)
        out["kd_vs_reference"] = max_diff(after, ref)
        out["kd_rel"] = rel_update_error(after, ref, ref_state)
        out["kd_moved"] = max_diff(ref, ref_state)
    backend.barrier()
    return out


def reference_kd_step(cfg, state, world, teacher):
    model = LlmModel(cfg)
    model.load_state_dict(state)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    batches = [batch(1, m, r, world) for m in range(GA) for r in range(world)]
    total = sum(int((lab != -100).sum()) for _, lab in batches)
    for ids, lab in batches:
        ls, _ = kd_loss(model, ids, lab, teacher)
        (ls / total).backward()
    opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def scenario_auto(kind: str, init_hidden: bool, workdir: str, tag: str) -> dict:
    """Default DsZero3Config sizes ('auto'), only the reduce bucket made 'auto' too (its default, 5e8, would
    allocate GBs on CPU)."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    run_dir = os.path.join(workdir, tag)
    backend = make_backend("z3", run_dir=run_dir, reduce_bucket_size="auto")
    cfg = model_config(False)
    model = wrapped(backend, cfg, initial_state(cfg), **({"hidden_size": HIDDEN} if init_hidden else {}))
    train_steps(backend, model, 1, GA, None, batch_fn=batch, loss_fn=full_logits_loss)
    zc = model._config.zero_config
    params = dict(backend.unwrap(model).named_parameters())
    large = {n: p for n, p in params.items() if p.ds_numel > 10 * HIDDEN}
    out = {
        "parsed": {"param_persistence_threshold": zc.param_persistence_threshold,
                   "prefetch_bucket_size": zc.prefetch_bucket_size, "reduce_bucket_size": zc.reduce_bucket_size},
        "written": backend.ds_dict["zero_optimization"],
        "n_large": len(large), "n_small": len(params) - len(large),
        "large_half": all(p.ds_tensor.numel() * 2 == p.ds_numel for p in large.values()),
        "large_released": all(p.data.numel() == 0 and p.ds_status == ZeroParamStatus.NOT_AVAILABLE
                              for p in large.values()),
        "large_persistent": sorted(n for n, p in large.items() if p.ds_persist),
        "small_persistent": all(p.ds_persist for n, p in params.items() if n not in large),
        "deepspeed_version": deepspeed.__version__,
    }
    if backend.is_main:
        import json
        with open(os.path.join(run_dir, "ds_config.json")) as f:
            out["json"] = json.load(f)["zero_optimization"]
    backend.barrier()
    return out


def scenario_auto_unresolved(kind: str, _unused, workdir: str, tag: str) -> dict:
    """A model without ``config.hidden_size`` under the default 'auto' sizes: ``wrap`` refuses (DeepSpeed's
    defaults would silently keep a small model unpartitioned) unless ``hidden_size=`` is given."""
    from common import TinyLM
    backend = make_backend("z3", reduce_bucket_size="auto")
    with backend.model_init_context():
        model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out = {}
    try:
        backend.wrap(model, opt, micro_batch_size=MICRO, grad_accum=GA, grad_clip=None)
        out["raised"] = None
    except ValueError as err:
        out["raised"] = str(err)
    backend.wrap(model, opt, micro_batch_size=MICRO, grad_accum=GA, grad_clip=None, hidden_size=HIDDEN)
    out["written"] = {k: backend.ds_dict["zero_optimization"][k] for k in (
        "stage3_param_persistence_threshold", "stage3_prefetch_bucket_size", "reduce_bucket_size")}
    return out


SCENARIOS = {}
for _kind in ("ddp", "z2", "z3"):
    for _tied in (False, True):
        SCENARIOS[f"projection-{_kind}-{'tied' if _tied else 'untied'}"] = (scenario_projection, _kind, _tied)
for _kind, _dtype in (("ddp", "fp32"), ("z2", "bf16"), ("z3", "fp32"), ("z3", "bf16")):
    SCENARIOS[f"frozen-{_kind}" + ("-bf16" if _dtype == "bf16" else "")] = (scenario_frozen, _kind, _dtype)
SCENARIOS["auto-z3"] = (scenario_auto, "z3", False)
SCENARIOS["auto-z3-init-hidden"] = (scenario_auto, "z3", True)
SCENARIOS["auto-z3-unresolved"] = (scenario_auto_unresolved, "z3", None)


def main() -> None:
    out_path, workdir, *names = sys.argv[1:]
    names = names or list(SCENARIOS)
    results = {}
    rank = int(os.environ.get("RANK", "0"))
    for name in names:
        fn, *args = SCENARIOS[name]
        t0 = time.perf_counter()
        try:
            res = fn(*args, workdir, name)
        except Exception:
            res = {"error": traceback.format_exc()}
            print(f"[rank {rank}] scenario {name} failed:\n{res['error']}", file=sys.stderr, flush=True)
        res["seconds"] = round(time.perf_counter() - t0, 2)
        results[name] = res
        if rank == 0:
            write_json(out_path, results)


if __name__ == "__main__":
    main()
