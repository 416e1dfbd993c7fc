"""The real `Trainer` (pretraining loop, not the backend harness) on 2 ranks (torchrun, gloo, CPU, fp32) against
one process on the same global batch.

ONE torchrun launch (tests/dist_scripts/trainer_parity.py) runs DDP, ZeRO-2, ZeRO-3 for STEPS steps, and an
interrupted (checkpoint at step STOP, crash) + resumed run under DDP and ZeRO-3; every run exports ``final/``.
The single-process references run here with ``batch_size × 2``.

Same global batch: ``ShardedSampler`` deals the epoch order round-robin (rank r takes global positions r, r+W, …)
and each rank's DataLoader takes ``batch_size`` consecutive positions of its share, so micro-batch j of the 2 ranks
together holds global positions [4j, 4j+4) — exactly micro-batch j of one process with batch 4. The loss is
normalised by the token count of the window summed over ranks and the backends sum gradients, so the update is the
same maths; only the summation order of reductions differs.

Tolerances: fp32 weights within 5e-6 max-abs and 1e-5 relative update error (``||Δw − Δw_ref|| / ||Δw_ref||``,
Δ = change from the initial weights) — reduction-order rounding (one fp32 ulp at |w|≈1 is 1.2e-7) amplified by
Adam's m/√v for elements with tiny second moments, the bound used by the backend-level parity tests too.
Resume under the same backend repeats the same operations in the same order, so it must be bitwise identical.
The optimizer decays weights (weight_decay=0.1): with the ZeRO-3 parameters' 1-D partitions deciding the decay
groups (the bug fixed in llm_trainer/optim.py) the ZeRO-3 run would drift far outside these bounds.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "dist_scripts"))
from runner import torchrun  # noqa: E402
from trainer_parity import MICRO_PER_RANK, STEPS, STOP, config  # noqa: E402

from trainer_utils import tiny_model_config, write_pretrain_tokens  # noqa: E402

pytestmark = pytest.mark.distributed
TOL, REL_TOL = 5e-6, 1e-5


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    from llm_trainer.model import LlmModel
    work = tmp_path_factory.mktemp("trainer_dist")
    torch.manual_seed(5)
    LlmModel(tiny_model_config()).save_pretrained(work / "init")
    write_pretrain_tokens(work / "tokens.npy", n=3000, seed=1)
    out = work / "results.json"
    proc = torchrun("trainer_parity.py", [str(out), str(work)], nproc=2, timeout=600)
    if not out.exists():
        pytest.fail(f"trainer torchrun launch wrote nothing (rc={proc.returncode})\n{proc.stderr[-4000:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), work


@pytest.fixture(scope="module")
def single(launch):
    """One process, batch_size × 2: the same global batch; returns its exported weights."""
    from llm_trainer import Trainer
    from llm_trainer.model import LlmModel
    _, work = launch
    tr = Trainer(train_config=config(str(work), "single", MICRO_PER_RANK * 2, None))
    tr.train()
    assert tr.backend.world_size == 1 and tr.global_step == STEPS
    return LlmModel.from_pretrained(work / "single" / "final").state_dict()


def _final(work, name):
    from llm_trainer.model import LlmModel
    final = work / name / "final"
    assert (final / "config.json").is_file(), f"{name}: no exported final/ folder"
    return LlmModel.from_pretrained(final).state_dict()


def _compare(state, ref, init):
    assert state.keys() == ref.keys()
    diff = max(float((state[k].float() - ref[k].float()).abs().max()) for k in ref)
    num = sum(float(((state[k].float() - ref[k].float()) ** 2).sum()) for k in ref)
    den = sum(float(((ref[k].float() - init[k].float()) ** 2).sum()) for k in ref)
    return diff, (num / den) ** 0.5, den ** 0.5


def _result(launch, name):
    results, _ = launch
    assert name in results, f"scenario {name} missing"
    res = results[name]
    assert "error" not in res, res["error"]
    return res


@pytest.mark.parametrize("name,backend", [("ddp", "ddp"), ("z2", "deepspeed"), ("z3", "deepspeed")])
def test_trainer_matches_single_process(launch, single, name, backend):
    res = _result(launch, name)
    _, work = launch
    assert res["backend"] == backend and res["world"] == 2 and res["steps"] == STEPS
    from llm_trainer.model import LlmModel
    start = LlmModel.from_pretrained(work / "init").state_dict()
    diff, rel, moved = _compare(_final(work, name), single, start)
    print(f"\n{name} vs single process: max |dw| {diff:.2e}, relative update error {rel:.2e}, update {moved:.3f}")
    assert moved > 1e-2                                    # training really moved the weights
    assert diff <= TOL and rel <= REL_TOL, (diff, rel)


def test_zero3_decays_the_same_parameters_as_single_process(launch):
    """The optimizer's decay group under ZeRO-3 (partitioned, 1-D local tensors) covers the same full shapes."""
    results, _ = launch
    z3, ddp = _result(launch, "z3"), _result(launch, "ddp")
    assert z3["decay_names"] == ddp["decay_names"]
    assert len(ddp["decay_names"]) == 15                  # 7 projections × 2 layers + the untied lm_head
    assert "model.layers.0.self_attn.q_proj.weight" in z3["decay_names"] and "lm_head.weight" in z3["decay_names"]


@pytest.mark.parametrize("name,straight", [("ddp_resume", "ddp"), ("z3_resume", "z3")])
def test_trainer_resume_continues_to_the_same_parameters(launch, name, straight):
    res = _result(launch, name)
    _, work = launch
    assert res["resumed_at"] == STOP and res["epoch_position"] == STOP * 2   # 2 micro-batches per step
    assert res["steps"] == STEPS and res["world"] == 2
    assert sorted(p.name for p in (work / name).glob("checkpoint-*")) == [f"checkpoint-{STOP}", f"checkpoint-{STEPS}"]
    a, b = _final(work, name), _final(work, straight)
    for k in a:
        assert torch.equal(a[k], b[k]), k                  # same backend, same operations: bitwise


def test_zero3_export_loads_and_equals_single_process_export(launch, single):
    """``final/`` of the ZeRO-3 run is a plain HF-format folder (config, safetensors, no DeepSpeed files) that
    ``LlmModel.from_pretrained`` loads into an unpartitioned model equal to the single-process export."""
    _, work = launch
    from llm_trainer.model import LlmModel
    final = work / "z3" / "final"
    model = LlmModel.from_pretrained(final)
    assert all(p.ndim >= 1 and p.numel() > 0 for p in model.parameters())
    assert sorted(p.name for p in final.glob("*.safetensors"))
    ref = LlmModel.from_pretrained(work / "single" / "final")
    ids = torch.randint(1, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)
    for k, v in ref.state_dict().items():
        assert float((model.state_dict()[k] - v).abs().max()) <= TOL, k


def test_zero3_sft_evaluation_equals_one_process(tmp_path):
    """Evaluation after training steps under ZeRO-3 (the chunked CE gathers the partitioned head in eval mode,
    where DeepSpeed may have prefetched it) gives the one-process eval losses."""
    from trainer_utils import write_sft
    from zero3_eval import run
    data = str(write_sft(tmp_path / "sft", n=16))
    proc = torchrun("zero3_eval.py", [str(tmp_path / "z3"), data], nproc=2, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    z3 = json.loads((tmp_path / "z3" / "losses.json").read_text())
    ref = run(str(tmp_path / "single"), data, ds=False)
    assert len(z3) == len(ref) == 4
    torch.testing.assert_close(torch.tensor(z3), torch.tensor(ref), rtol=1e-5, atol=1e-6)
