"""Multi-turn GRPO and PPO through the real loop (tiny model, tokenizer with the built-in ChatML template):
the trainer's input ids are the generated and appended ids of every turn, environment tokens carry no loss, rewards
come from the environment and the reward functions, the rollout/trainer log-prob gap is logged every step, TIS/MIS
weights reach the loss, ``old_logprobs='generation'`` skips the old-policy forward, and bad input is named."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from agentic_helpers import CountdownEnv, chatml_tokenizer  # noqa: E402
from rl_helpers import copy_reward, grpo_train_config  # noqa: E402

from llm_trainer.configs import (EpisodeConfig, GRPOConfig, OptimConfig, PPOConfig, RolloutCorrectionConfig,  # noqa: E402
                                 TrainConfig)
from llm_trainer.data.formats import DataError  # noqa: E402
from llm_trainer.envs import EnvironmentFailure, ToolEnvironment, calculator  # noqa: E402
from llm_trainer.generation import GenerateConfig  # noqa: E402
from llm_trainer.model import ModelConfig  # noqa: E402
from llm_trainer.trainers.grpo import GRPOTrainer  # noqa: E402
from llm_trainer.trainers.ppo import PPOTrainer  # noqa: E402
from llm_trainer.trainers.rewards import RewardFunctionError  # noqa: E402


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    chatml_tokenizer(d)
    return str(d / "tok")


def _records(n=8):
    return [{"prompt": f"count {i}", "answer": str(i % 3)} for i in range(n)]


def _config(tmp_path, tok_dir, stage="grpo", steps=2, turns=3, chunk=None, **stage_kw):
    from llm_trainer.tokenizer import Tokenizer
    tok = Tokenizer(tok_dir)
    # about half of the vocabulary stops a turn: replies of a few tokens, so episodes have several turns
    gc = GenerateConfig(max_new_tokens=6, temperature=1.0, stop_token_ids=list(range(150, tok.vocab_size)))
    mc = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=256, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    ec = EpisodeConfig(max_turns=turns, max_episode_tokens=120)
    if stage == "grpo":
        stage_kw = {"grpo_config": GRPOConfig(group_size=4, loss_beta=0.0, generate_config=gc, episode_config=ec,
                                              chunked_rollout_size=chunk, **stage_kw)}
    else:
        stage_kw = {"ppo_config": PPOConfig(generate_config=gc, episode_config=ec, chunked_rollout_size=chunk,
                                            **stage_kw)}
    return TrainConfig(model_config=mc, tokenizer=tok_dir, file_dataset=_records(), max_steps=steps,
                       batch_size=2 if stage == "grpo" else 4,
                       output_dir=str(tmp_path), optim_config=OptimConfig(initial_lr=1e-3), save_interval=None,
                       eval_interval=None, log_interval=1, dtype="fp32", seed=0, **stage_kw)


def _spy(tr):
    """Record each rollout's episodes (through play_episodes) and micro-batches."""
    seen = {"episodes": [], "micro": []}
    play, make = tr.play_episodes, tr.make_rollout_batches

    def spy_play(episodes, engine, generator):
        rounds = play(episodes, engine, generator)
        seen["episodes"].append(episodes)
        seen.setdefault("rounds", []).append(rounds)
        return rounds

    def spy_make(prompts):
        micro = make(prompts)
        seen["micro"].append([{k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()} for b in micro])
        return micro
    tr.play_episodes, tr.make_rollout_batches = spy_play, spy_make
    return seen


def _rows(b):
    P = b["prompt_len"]
    for r in range(b["input_ids"].size(0)):
        real = b["attention_mask"][r].bool()
        yield b["input_ids"][r][real].tolist(), b["completion_mask"][r][:int(real[P:].sum())].tolist()


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_trainer_input_ids_are_the_generated_and_appended_ids_of_every_turn(tmp_path, tok_dir, stage):
    cls = GRPOTrainer if stage == "grpo" else PPOTrainer
    tr = cls(train_config=_config(tmp_path, tok_dir, stage, chunk=3), environment=lambda: CountdownEnv(3),
             reward_func=lambda completions, **_: [float(len(c)) for c in completions])
    seen = _spy(tr)
    tr.train()
    assert len(seen["episodes"]) == 2
    multi = 0
    for episodes, micro in zip(seen["episodes"], seen["micro"]):
        expected = {}
        for e in episodes:
            ids, mask = list(e.prompt_ids), []
            for t in e.turns:                               # turn after turn: generated ids, then appended ids
                assert e.ids[t.start:t.start + len(t.generated)] == t.generated
                ids += t.generated + t.appended
                mask += [1] * len(t.generated) + [0] * len(t.appended)
            assert ids == e.prompt_ids + e.ids
            multi += len(e.turns) > 1 and any(t.appended for t in e.turns)
            expected.setdefault(tuple(ids), []).append(mask)
        rows = [row for b in micro for row in _rows(b)]
        assert len(rows) == len(episodes)
        for ids, mask in rows:                               # each row is an episode's ids, loss only on its own ids
            assert mask in expected[tuple(ids)]
        if stage == "ppo":                                   # GAE skips the environment's tokens
            for b in micro:
                off = b["completion_mask"] == 0
                assert torch.all(b["advantages"][off] == 0) and torch.all(b["returns"][off] == 0)
    assert multi > len(episodes)                             # episodes really had several turns
    assert any(len(set(r)) > 1 for rounds in seen["rounds"] for r in rounds)   # rounds mixed turns
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in logged if "loss" in x]
    for key in ("env/turns", "env/reward", "env/steps", "env/generation_rounds", "logprob_gap/mean",
                "logprob_gap/max", "logprob_gap/kl", "reward/env/mean"):
        assert all(key in x for x in steps), key
    assert all(0 <= x["logprob_gap/max"] < 1e-4 and x["logprob_gap/kl"] < 1e-8 for x in steps)


def test_rewards_add_the_environment_and_the_reward_functions(tmp_path, tok_dir):
    tr = GRPOTrainer(train_config=_config(tmp_path, tok_dir), environment=lambda: CountdownEnv(2),
                     reward_func=lambda completions, messages, env_rewards, **_: [10.0] * len(completions))
    batch = next(tr.prompt_batches())
    rollout, rewards = tr.sample(batch)
    env = torch.tensor(rollout.env_reward)
    assert torch.equal(rewards.total, env + 10.0) and torch.equal(rewards.per_function["env"], env)
    assert all(m[0]["role"] == "user" and m[-1]["role"] == "assistant" for m in rollout.messages)
    assert rollout.completion_text == [m[-1]["content"] for m in rollout.messages]   # the final reply


def test_environment_only_rewards_and_jsonl_records(tmp_path, tok_dir):
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    cfg = _config(tmp_path / "run", tok_dir)
    cfg.file_dataset = str(data)
    tr = GRPOTrainer(train_config=cfg, environment=lambda: CountdownEnv(2))      # no reward function
    assert len(tr.train_dataset) == 8
    stats = tr.train()
    assert stats["grad_norm"] > 0 and stats["reward/mean"] == stats["reward/env/mean"]   # the env's reward alone
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n[1, 2]\n')
    cfg = _config(tmp_path / "bad_run", tok_dir)
    cfg.file_dataset = str(bad)
    with pytest.raises(DataError, match=r"bad.jsonl.*line 2.*a record must be a JSON object"):
        GRPOTrainer(train_config=cfg, environment=lambda: CountdownEnv(2))


class _Exploding(CountdownEnv):
    def step(self, text):
        if self.n == 1:
            raise KeyError("missing state")
        return super().step(text)


def test_bad_input_is_named(tmp_path, tok_dir):
    tr = GRPOTrainer(train_config=_config(tmp_path / "a", tok_dir), environment=lambda: _Exploding(3))
    with pytest.raises(EnvironmentFailure, match=r"environment '_Exploding' at turn 1 of episode \d+ \(record "
                                                 r"\{'prompt': 'count \d', 'answer': '\d'\}\): KeyError"):
        tr.train()
    tr = GRPOTrainer(train_config=_config(tmp_path / "b", tok_dir), environment=lambda: CountdownEnv(2),
                     reward_func=lambda completions, **_: [1.0])
    with pytest.raises(RewardFunctionError, match=r"reward function '<lambda>' returned 1 values for 8 completions"):
        tr.train()
    tr = GRPOTrainer(train_config=_config(tmp_path / "c", tok_dir), environment=lambda: CountdownEnv(2),
                     reward_func=lambda completions, **_: [float("nan")] * len(completions))
    with pytest.raises(RewardFunctionError, match=r"'<lambda>' returned non-finite values"):
        tr.train()
    with pytest.raises(TypeError, match="environment must be a factory"):
        GRPOTrainer(train_config=_config(tmp_path / "d", tok_dir), environment=CountdownEnv(2))
    with pytest.raises(TypeError, match="returned int, which has no reset/step"):
        GRPOTrainer(train_config=_config(tmp_path / "e", tok_dir), environment=lambda: 3).train()
    cfg = _config(tmp_path / "f", tok_dir, rollout_correction=RolloutCorrectionConfig())
    with pytest.raises(ValueError, match="rollout_correction .* with old_logprobs='generation' there is no"):
        GRPOTrainer(train_config=cfg, environment=lambda: CountdownEnv(2), old_logprobs="generation")
    with pytest.raises(ValueError, match="EpisodeConfig.max_turns must be an int >= 1"):
        EpisodeConfig(max_turns=0)
    with pytest.raises(ValueError, match="RolloutCorrectionConfig.mode must be one of"):
        RolloutCorrectionConfig(mode="clip")


def test_tool_environment_in_the_trainer_and_evaluation(tmp_path, tok_dir):
    """The calculator environment end to end (the random model's replies are rarely tool calls; the format is read
    off the template) and the greedy evaluation of held-out records with episode statistics."""
    cfg = _config(tmp_path, tok_dir, steps=1)
    cfg.eval_file_dataset = calculator.records(4)
    tr = GRPOTrainer(train_config=cfg, environment=lambda: ToolEnvironment([calculator.add]),
                     reward_func=calculator.answer_reward)
    env = tr.new_episodes(calculator.records(1), 1)[0].env
    assert env.tool_format == "hermes"
    out = tr.evaluate()
    assert 0.0 <= out["eval_reward"] <= 1.0 and "eval_env/turns" in out and "eval_reward/answer_reward" in out


@pytest.mark.parametrize("mode", ["tis", "mis"])
def test_rollout_correction_weights_reach_the_loss(tmp_path, mode):
    cfg = grpo_train_config(tmp_path, steps=1, rollout_correction=RolloutCorrectionConfig(mode=mode, threshold=1.0))
    tr = GRPOTrainer(train_config=cfg, reward_func=copy_reward)
    window = next(tr.training_windows())
    b = tr.to_device(window[0])
    w = b["is_weight"]
    m = b["completion_mask"] > 0
    assert w.shape == m.shape and torch.all(w[~m] == 0) and bool((w[m] > 0).any())
    assert torch.all(w[m] <= 1.0) if mode == "tis" else torch.all((w[m] == 0) | (w[m] <= 1.0))
    weighted = tr.compute_loss(tr.model, b).loss
    b.pop("is_weight")
    plain = tr.compute_loss(tr.model, b).loss
    assert not torch.equal(weighted, plain)                      # the gap is ~1e-7, not 0: some weights differ
    st = tr.rollout_stats            # kept weights are ~1: TIS's mean is ~1, MIS's the share of tokens kept
    kept = 1.0 if mode == "tis" else 1.0 - st["rollout_is/clip_frac"]
    assert 0 < st["rollout_is/clip_frac"] < 1 and abs(st["rollout_is/mean"] - kept) < 1e-3


def test_generation_log_probs_skip_the_old_forward_and_the_gap_is_probed(tmp_path):
    tr = GRPOTrainer(train_config=grpo_train_config(tmp_path, steps=2), reward_func=copy_reward,
                     old_logprobs="generation")
    stats = tr.train()
    assert "time/old_logp" not in stats                          # no old-policy forward pass
    assert 0.0 <= stats["logprob_gap/max"] < 1e-4 and stats["logprob_gap/mean"] <= stats["logprob_gap/max"]
