"""Evaluators and the ClassificationTrainer on 2 ranks (torchrun, gloo, CPU, fp32) under DDP and DeepSpeed ZeRO-3
against one process: ONE launch of tests/dist_scripts/eval_parity.py runs both backends.

Evaluators split their requests over the ranks, keep the ranks' forward passes in step and sum the per-request
results, so the metrics equal one process up to the float rounding of other batch compositions (1e-5). The
classifier trains on the same global batch (2 ranks × 2, one process × 4; accumulation 2, Adam with weight decay,
clipping, class weights) and must end at the single process's weights within the bounds of
test_trainer_distributed.py (5e-6 max-abs, 1e-5 relative update error) and give its held-out metrics.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "dist_scripts"))
from eval_parity import CLS_BATCH, make_workdir, run  # noqa: E402
from runner import torchrun  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
TOL, REL_TOL = 5e-6, 1e-5


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    work = make_workdir(tmp_path_factory.mktemp("eval_dist"))
    out = work / "results.json"
    proc = torchrun("eval_parity.py", [str(out), str(work)], nproc=2, timeout=600)
    if not out.exists():
        pytest.fail(f"torchrun launch wrote nothing (rc={proc.returncode})\n{proc.stderr[-4000:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), work


@pytest.fixture(scope="module")
def single(launch):
    _, work = launch
    return run(str(work), "single", None, CLS_BATCH * 2)


def _weights(path):
    from safetensors.torch import load_file
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("name,backend", [("ddp", "ddp"), ("z3", "deepspeed")])
def test_two_ranks_equal_one_process(launch, single, name, backend):
    results, work = launch
    res = results[name]
    assert "error" not in res, res.get("error")
    assert res["world"] == 2 and res["backend"] == backend and single["world"] == 1
    metrics = [k for k in single if k.startswith("eval/")]
    assert {"eval/mc/acc", "eval/mc_chat/acc_norm", "eval/ppl/nll", "eval/gen/exact_match", "eval/gen/reward"} \
        <= set(metrics)
    for k in metrics:
        assert res[k] == pytest.approx(single[k], rel=1e-5, abs=1e-6), k
    print(f"\n{name}: " + ", ".join(f"{k} {res[k]:.4f}" for k in sorted(metrics)))
    # the classifier: same weights, same held-out metrics
    ref, got = _weights(work / "single_clf" / "final"), _weights(work / f"{name}_clf" / "final")
    init = {k: v for k, v in _weights(work / "init").items()}
    diff = max(float((got[k] - ref[k]).abs().max()) for k in ref)
    num = sum(float(((got[k] - ref[k]) ** 2).sum()) for k in ref)
    den = sum(float(((ref[k] - (init[k] if k in init else torch.zeros_like(ref[k]))) ** 2).sum()) for k in ref)
    assert ref.keys() == got.keys() and "score.weight" in ref
    assert diff <= TOL and (num / den) ** 0.5 <= REL_TOL, (diff, (num / den) ** 0.5)
    cls, ref_cls = res["classify"], single["classify"]
    assert cls["confusion_matrix"] == ref_cls["confusion_matrix"] and sum(map(sum, cls["confusion_matrix"])) == 24
    assert cls["loss"] == pytest.approx(ref_cls["loss"], rel=1e-5)
