"""2-rank GRPO under torch DDP and under DeepSpeed ZeRO-3 (torchrun, gloo, CPU, fp32): one launch per backend.

Run as a script by torchrun (``python -m torch.distributed.run --nproc-per-node=2 THIS OUT.json WORKDIR ddp|z3``):
each rank trains 3 GRPO steps (β > 0, so the reference replica is exercised; 2 micro-batches per step) and rank 0
writes: each rank's first-rollout completions (must differ: sampling is seeded per rank), a checksum of the full
parameters on every rank after training (must be equal: the update is synchronised) and before (must differ from
after: training moved the weights), and the logged stats.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 3


def _checksum(trainer) -> list[float]:
    with trainer.backend.gathered_for_generation(trainer.model) as plain:
        return [float(p.detach().double().sum()) + float(p.detach().double().abs().sum()) for p in plain.parameters()]


def main(out_path: str, workdir: str, kind: str) -> None:
    sys.path.insert(0, HERE)
    from rl_helpers import copy_reward, grpo_train_config, write_rank_result
    from llm_trainer.parallel import DsConfig, DsZero3Config
    from llm_trainer.trainers.grpo import GRPOTrainer
    ds = None
    if kind == "z3":
        ds = DsConfig(zero_config=DsZero3Config(stage3_param_persistence_threshold=0,
                                                stage3_prefetch_bucket_size=10_000, sub_group_size=100_000,
                                                reduce_bucket_size=50_000, allgather_bucket_size=50_000),
                      gradient_clipping=1.0, steps_per_print=10**9)
    cfg = grpo_train_config(os.path.join(workdir, kind), steps=STEPS, batch_size=2, group_size=4, loss_beta=0.05,
                            grpo_batch_size=4, gradient_accumulation_steps=2, loss_type="dapo")
    cfg.ds_config = ds
    result: dict = {}
    try:
        tr = GRPOTrainer(train_config=cfg, reward_func=copy_reward)
        rank = tr.backend.rank
        before = _checksum(tr)
        first = {}
        orig = tr.sample

        def spy(batch):
            rollout, rewards = orig(batch)
            first.setdefault("completions", rollout.completion_ids)
            first.setdefault("prompts", rollout.prompt_ids)
            return rollout, rewards
        tr.sample = spy
        probe = tr.engine.generate(tr.model, [[1, 5, 13]] * 4, tr.rollout_generator()).completions  # same prompt
        stats = tr.train()
        after = _checksum(tr)
        gathered = tr.backend.all_gather_object({"rank": rank, "completions": first["completions"],
                                                 "prompts": first["prompts"], "probe": probe, "after": after, "before": before,
                                                 "backend": tr.backend.name})
        result = {"ranks": gathered, "stats": {k: v for k, v in stats.items() if isinstance(v, (int, float))},
                  "global_step": tr.global_step, "ref": type(tr.reference.frozen).__name__}
    except Exception as e:  # noqa: BLE001 - reported to the test
        import traceback
        result = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
    write_rank_result(out_path, result)


if __name__ == "__main__":
    main(*sys.argv[1:4])
    sys.exit(0)


pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("kind", ["ddp", "z3"])
def test_two_rank_grpo(tmp_path, kind):
    import subprocess
    sys.path.insert(0, os.path.join(HERE, "dist_scripts"))
    from runner import ROOT, subprocess_env
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", os.path.abspath(__file__),
           str(out), str(tmp_path), kind]
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    if not out.exists():
        pytest.fail(f"GRPO {kind} torchrun launch wrote nothing (rc={proc.returncode})\n{proc.stderr[-4000:]}")
    res = json.loads(out.read_text())
    assert "error" not in res, res["error"]
    r0, r1 = res["ranks"]
    assert r0["backend"] == r1["backend"] == {"ddp": "ddp", "z3": "deepspeed"}[kind]
    assert res["global_step"] == STEPS
    assert res["ref"] == {"ddp": "LlmModel", "z3": "DeepSpeedEngine"}[kind]   # ZeRO-3: a partitioned reference
    assert r0["prompts"] != r1["prompts"]                       # each rank has its own share of the prompts
    assert r0["completions"] != r1["completions"]
    assert r0["probe"] != r1["probe"]                           # same prompt, different per-rank sampling stream
    assert r0["after"] == r1["after"]                           # synchronised update: identical parameters
    assert r0["before"] == r1["before"] and r0["after"] != r0["before"]
