"""PPOTrainer through the real loop: ratio 1, GAE with bootstrap at truncation, KL-penalised rewards, adaptive KL,
missing-EOS penalty, reward normalisation, value model variants and optimizer groups, ptx, export, learning."""
from __future__ import annotations

import pytest
import torch

from llm_trainer.configs import AdaptiveKLConfig, OptimConfig
from llm_trainer.generation import GenerateConfig
from llm_trainer.losses.rl import gae, kl_penalized_rewards
from llm_trainer.model import LlmModel
from llm_trainer.losses import huber, value_loss
from llm_trainer.parallel.base import head_projection
from llm_trainer.trainers.ppo import PPOTrainer
from llm_trainer.trainers.rewards import RewardSet
from llm_trainer.trainers.rollout import completion_logps
from rl_helpers import EOS, copy_items, copy_reward, ppo_train_config

# about half the worst measured gain, 0.219 (seeds 1-4; the same on every kernel set and thread count measured by
# tests/learning_margins.py on 2026-11-28, docs/benchmarks.md "Learning tests' margins")
MIN_DENSE_GAIN = 0.1


def _fixed_service(completions):
    def service(model, prompts, config, group_size):
        return [completions[i % len(completions)] for i in range(len(prompts) * group_size)]
    return service


def _trainer(tmp_path, reward=copy_reward, service=None, **kw):
    return PPOTrainer(train_config=ppo_train_config(tmp_path, **kw), reward_func=reward, generation_service=service)


@pytest.mark.parametrize("head", [False, True])
def test_first_step_ratio_is_one_and_value_model_variants(tmp_path, head):
    tr = _trainer(tmp_path, value_head_on_policy=head, kl_beta=0.1, ppo_batch_size=4, gradient_accumulation_steps=2)
    plain = tr.backend.unwrap(tr.model)
    assert (plain.value_backbone is None) == head
    window = next(tr.training_windows())
    for batch in window:
        b = tr.to_device(batch)
        m = b["completion_mask"] > 0
        out = completion_logps(tr.model, b, tr.temperature, project=head_projection(plain.policy), with_values=True)
        assert torch.equal(out["logp"][m], b["old_logp"][m])
        assert torch.equal(out["values"][:, :m.size(1)][m], b["old_values"][m])
        lo = tr.compute_loss(tr.model, b)
        assert lo.extra["ratio_max"] == 1.0 and lo.extra["clip_frac"] == 0.0 and lo.extra["vf_clip_frac"] == 0.0
    stats = tr.train_step(window)
    assert stats["kl_coef"] == 0.1 and abs(stats["kl"]) < 1e-5                # reference = initial policy


def test_gae_bootstraps_truncated_completions_and_kl_rewards(tmp_path):
    comps = [[5, EOS], [6, 6, 6], [7, EOS], [4, 4, 4]]                     # ended, truncated, ended, truncated
    tr = _trainer(tmp_path, service=_fixed_service(comps), batch_size=4, kl_beta=0.2, kl_estimator="k3",
                  whiten_advantages=False, gamma=0.9, lam=0.8, generate_config=GenerateConfig(max_new_tokens=3),
                  reward=lambda completion_ids: [float(c[0]) for c in completion_ids])
    head = tr.backend.unwrap(tr.model).value_head          # zero-initialised: give it values to bootstrap from
    torch.nn.init.normal_(head.weight, std=0.5)
    head.bias.data.fill_(0.3)
    b = tr.make_rollout_batches(tr.prompt_batches())[0]
    m = b["completion_mask"]
    scores = b["input_ids"][:, b["prompt_len"]].float()
    # pretend the reference differs so the KL term is visible: recompute with the stored log-probs
    expect_r, _ = kl_penalized_rewards(scores, b["old_logp"], b["ref_logp"], m, 0.2, "k3")
    torch.testing.assert_close(b["rewards"], expect_r)
    # bootstrap: V(state after the last token) for truncated rows, 0 for rows that ended with EOS
    T = m.size(1)
    with torch.no_grad():
        full = completion_logps(tr.backend.unwrap(tr.model), tr.to_device(b),
                                project=head_projection(tr.backend.unwrap(tr.model).policy),
                                with_values=True)["values"]
    lengths = m.sum(1).long()
    truncated = torch.tensor([row[b["prompt_len"]:].tolist()[:3] in ([6, 6, 6], [4, 4, 4]) for row in b["input_ids"]])
    boot = torch.where(truncated, full.gather(1, lengths[:, None]).squeeze(1), torch.zeros(4))
    adv, ret = gae(b["rewards"], full[:, :T], m, 0.9, 0.8, bootstrap_values=boot)
    torch.testing.assert_close(b["advantages"], adv)
    torch.testing.assert_close(b["returns"], ret)
    assert truncated.sum() == 2 and (boot[truncated] != 0).all()


def test_missing_eos_penalty_and_reward_normalisation(tmp_path):
    comps = [[5, EOS], [6, 6, 6]]
    base = dict(service=_fixed_service(comps), batch_size=4, kl_beta=0.0, generate_config=GenerateConfig(max_new_tokens=3),
                reward=lambda completion_ids: [1.0] * len(completion_ids))
    tr = _trainer(tmp_path / "a", missing_eos_penalty=2.0, **base)
    tr.make_rollout_batches(tr.prompt_batches())
    stats = tr.rollout_stats
    assert stats["score_mean"] == pytest.approx((1.0 + (1.0 - 2.0)) / 2)
    tr = _trainer(tmp_path / "b", missing_eos_penalty=2.0, normalize_rewards=True, normalize_method="batch", **base)
    tr.make_rollout_batches(tr.prompt_batches())
    assert tr.rollout_stats["score_mean"] == pytest.approx(0.0, abs=1e-6)
    tr = _trainer(tmp_path / "c", normalize_rewards=True, normalize_method="running", **base)
    tr.make_rollout_batches(tr.prompt_batches())
    assert tr.reward_stats.count == 4 and tr.reward_stats.mean == pytest.approx(1.0)


def test_adaptive_kl_moves_beta_and_is_checkpointed(tmp_path):
    tr = _trainer(tmp_path, kl_beta=0.5, adaptive_kl=AdaptiveKLConfig(target=1.0, horizon=10), steps=3, lr=5e-2,
                  ppo_epochs=1)
    tr.train()
    assert tr.kl_ctl.value < 0.5                       # measured KL << target: beta shrinks
    tr.save_checkpoint()
    ckpts = sorted(p for p in tmp_path.iterdir() if p.name.startswith("checkpoint"))
    assert (ckpts[-1] / "ppo_state.json").is_file()


def test_value_optimizer_groups_and_huber(tmp_path):
    tr = _trainer(tmp_path, value_optim_config=OptimConfig(initial_lr=1.5e-3, weight_decay=0.0, betas=(0.8, 0.9)))
    groups = {g["group_name"]: g for g in tr.optimizer.param_groups}
    assert {"decay", "no_decay", "value_decay", "value_no_decay"} <= set(groups)
    assert groups["value_decay"]["lr"] == pytest.approx(1.5e-3) and groups["decay"]["lr"] == pytest.approx(3e-3)
    assert groups["value_decay"]["betas"] == (0.8, 0.9) and groups["value_decay"]["weight_decay"] == 0.0
    x = torch.tensor([0.5, -3.0])
    torch.testing.assert_close(huber(x, 1.0), torch.tensor([0.125, 2.5]))
    v, old, ret = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    s, m = value_loss(v, old, ret, torch.ones(1, 2), 0.5, 1.0)
    # token 0: max(huber(2), huber(0.5)) = 1.5 ; token 1: huber(-1) = 0.5
    assert float(s) == pytest.approx(2.0) and float(m["vf_clip_frac"]) == 0.0


def test_ptx_needs_answers_and_export(tmp_path):
    tr = _trainer(tmp_path, ptx_coef=0.5, steps=2)
    tr.train()
    assert (tmp_path / "final" / "config.json").is_file() and (tmp_path / "value_model" / "model.safetensors").is_file()
    LlmModel.from_pretrained(tmp_path / "final")
    cfg = ppo_train_config(tmp_path / "b", ptx_coef=0.5)
    cfg.file_dataset = [{"prompt_ids": torch.tensor([1, 5, 13])}] * 64
    tr = PPOTrainer(train_config=cfg, reward_func=lambda completion_ids: [0.0] * len(completion_ids))
    with pytest.raises(ValueError, match="ptx_coef > 0 needs reference answers"):
        tr.make_rollout_batches(tr.prompt_batches())


def dense_copy(completion_ids, answer_ids):
    """1 for every generated token equal to the prompt's digit (a dense, per-token reward)."""
    return [[1.0 if t == a[0] else 0.0 for t in c] for c, a in zip(completion_ids, answer_ids)]


def measure_dense_reward(out, seed: int) -> dict[str, float]:
    """60 PPO steps on the dense copy reward: held-out greedy copy accuracy before and after."""
    cfg = ppo_train_config(out, n_items=2048, steps=60, batch_size=32, seed=seed, ppo_epochs=2, ppo_batch_size=16,
                           kl_beta=0.0, vf_coef=0.5)
    tr = PPOTrainer(train_config=cfg, reward_func=dense_copy)
    held = copy_items(128, seed=100 + seed)
    tr.rewards = RewardSet(copy_reward)              # evaluate the held-out greedy copy accuracy
    before = tr.evaluate_rewards(held)["eval_reward"]
    tr.rewards = RewardSet(dense_copy)               # train on the dense reward
    tr.train()
    tr.rewards = RewardSet(copy_reward)
    return {"before": before, "after": tr.evaluate_rewards(held)["eval_reward"]}


def test_ppo_learns_a_dense_reward(tmp_path, capsys):
    """PPO trained on the dense copy reward raises the held-out greedy copy accuracy in 60 steps (the margin's
    measurements over seeds, threads and CPU kernels: tests/learning_margins.py, docs/benchmarks.md)."""
    results = {seed: measure_dense_reward(tmp_path / str(seed), seed) for seed in (1, 2)}
    with capsys.disabled():
        for seed, r in results.items():
            print(f"\nPPO dense copy reward seed {seed}: held-out greedy copy accuracy {r['before']:.3f} -> "
                  f"{r['after']:.3f}")
    assert min(r["after"] - r["before"] for r in results.values()) > MIN_DENSE_GAIN, results
