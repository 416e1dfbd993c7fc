"""2-rank multi-turn GRPO and PPO under torch DDP and DeepSpeed ZeRO-3 (torchrun, gloo, CPU, fp32).

Run as a script by torchrun (``python -m torch.distributed.run --nproc-per-node=2 THIS OUT.json WORKDIR TOK
ddp|z3 grpo|ppo``): each rank plays its own episodes with an environment whose episodes last a number of turns that
depends on the replies (so the ranks run different numbers of generation rounds inside the one weight gather of a
rollout, ZeRO-3 included), in rounds of at most 3 episodes that mix turns; rank 0 writes each rank's episodes, the
parameters of every rank before and after training (must be equal after, and moved) and the logged stats.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 2


class ReplyLengthEnv:
    """Ends the episode when the reply has an even number of characters (or after 4 replies); reward: its length."""

    def __init__(self):
        self.n = 0

    def reset(self, record):
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, text):
        self.n += 1
        done = len(text) % 2 == 0 or self.n >= 4
        return (None if done else [{"role": "user", "content": "more"}]), float(len(text) % 3), done


def _checksum(trainer) -> list[float]:
    with trainer.backend.gathered_for_generation(trainer.model) as plain:
        return [float(p.detach().double().sum()) + float(p.detach().double().abs().sum()) for p in plain.parameters()]


def main(out_path: str, workdir: str, tok_dir: str, kind: str, stage: str) -> None:
    sys.path.insert(0, HERE)
    from rl_helpers import write_rank_result
    from llm_trainer.configs import EpisodeConfig, GRPOConfig, OptimConfig, PPOConfig, TrainConfig
    from llm_trainer.generation import GenerateConfig
    from llm_trainer.model import ModelConfig
    from llm_trainer.parallel import DsConfig, DsZero3Config
    from llm_trainer.tokenizer import Tokenizer
    from llm_trainer.trainers.grpo import GRPOTrainer
    from llm_trainer.trainers.ppo import PPOTrainer
    tok = Tokenizer(tok_dir)
    gc = GenerateConfig(max_new_tokens=5, temperature=1.0, stop_token_ids=list(range(150, tok.vocab_size)))
    ec = EpisodeConfig(max_turns=4, max_episode_tokens=100)
    stage_cfg = {"grpo_config": GRPOConfig(group_size=2, loss_beta=0.05, generate_config=gc, episode_config=ec,
                                           chunked_rollout_size=3, grpo_batch_size=3)} if stage == "grpo" else \
        {"ppo_config": PPOConfig(generate_config=gc, episode_config=ec, chunked_rollout_size=3, ppo_batch_size=3)}
    ds = None
    if kind == "z3":
        ds = DsConfig(zero_config=DsZero3Config(stage3_param_persistence_threshold=0,
                                                stage3_prefetch_bucket_size=10_000, sub_group_size=100_000,
                                                reduce_bucket_size=50_000, allgather_bucket_size=50_000),
                      gradient_clipping=1.0, steps_per_print=10**9)
    cfg = TrainConfig(model_config=ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, max_position_embeddings=128,
                                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
                      tokenizer=tok_dir, file_dataset=[{"prompt": f"say {i}"} for i in range(16)], batch_size=4,
                      max_steps=STEPS, output_dir=os.path.join(workdir, kind + stage), dtype="fp32", seed=0,
                      optim_config=OptimConfig(initial_lr=1e-3), save_interval=None, eval_interval=None,
                      log_interval=1, ds_config=ds, gradient_accumulation_steps=3 if stage == "grpo" else 2,
                      **stage_cfg)
    result: dict = {}
    try:
        cls = GRPOTrainer if stage == "grpo" else PPOTrainer
        tr = cls(train_config=cfg, environment=ReplyLengthEnv)
        rank = tr.backend.rank
        before = _checksum(tr)
        seen = []
        play = tr.play_episodes

        def spy(episodes, engine, generator):
            rounds = play(episodes, engine, generator)
            seen.append({"rounds": rounds, "ids": [e.prompt_ids + e.ids for e in episodes],
                         "turns": [len(e.turns) for e in episodes]})
            return rounds
        tr.play_episodes = spy
        stats = tr.train()
        after = _checksum(tr)
        gathered = tr.backend.all_gather_object({"rank": rank, "rollouts": seen, "after": after, "before": before,
                                                 "backend": tr.backend.name})
        result = {"ranks": gathered, "stats": {k: v for k, v in stats.items() if isinstance(v, (int, float))},
                  "global_step": tr.global_step}
    except Exception as e:  # noqa: BLE001 - reported to the test
        import traceback
        result = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
    write_rank_result(out_path, result)


if __name__ == "__main__":
    main(*sys.argv[1:6])
    sys.exit(0)


pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    sys.path.insert(0, HERE)
    from agentic_helpers import chatml_tokenizer
    d = tmp_path_factory.mktemp("tok")
    chatml_tokenizer(d)
    return str(d / "tok")


@pytest.mark.parametrize("kind,stage", [("ddp", "grpo"), ("z3", "grpo"), ("ddp", "ppo"), ("z3", "ppo")])
def test_two_rank_multi_turn(tmp_path, tok_dir, kind, stage):
    import subprocess
    sys.path.insert(0, os.path.join(HERE, "dist_scripts"))
    from runner import ROOT, subprocess_env
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", os.path.abspath(__file__),
           str(out), str(tmp_path), tok_dir, kind, stage]
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    for path in (out, tmp_path / "result.json.rank1"):
        if path.exists() and "error" in json.loads(path.read_text()):
            pytest.fail(json.loads(path.read_text())["error"])
    if not out.exists():
        pytest.fail(f"{kind}/{stage} torchrun launch wrote nothing (rc={proc.returncode})\n{proc.stderr[-4000:]}")
    res = json.loads(out.read_text())
    r0, r1 = res["ranks"]
    assert r0["backend"] == r1["backend"] == {"ddp": "ddp", "z3": "deepspeed"}[kind]
    assert res["global_step"] == STEPS and len(r0["rollouts"]) == len(r1["rollouts"]) == STEPS
    assert r0["rollouts"][0]["ids"] != r1["rollouts"][0]["ids"]          # each rank plays its own episodes
    turns = [t for r in (r0, r1) for ro in r["rollouts"] for t in ro["turns"]]
    assert max(turns) > 1 and min(turns) >= 1
    assert any(len(set(rd)) > 1 for r in (r0, r1) for ro in r["rollouts"] for rd in ro["rounds"])   # mixed turns
    assert r0["after"] == r1["after"]                                     # synchronised update
    assert r0["before"] == r1["before"] and r0["after"] != r0["before"]
    assert "env/turns" in res["stats"] and "logprob_gap/max" in res["stats"]
