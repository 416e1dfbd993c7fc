"""GRPOTrainer through the real loop: exact ratio 1, the four aggregations, reference, filtering, masking, errors."""
from __future__ import annotations

import pytest
import torch

from llm_trainer.generation import GenerateConfig
from llm_trainer.losses.rl import group_advantages
from llm_trainer.trainers.grpo import GRPOTrainer
from llm_trainer.trainers.rewards import RewardFunctionError
from llm_trainer.trainers.rollout import completion_logps
from rl_helpers import EOS, copy_items, copy_reward, grpo_train_config

# about half the worst measured gain, 0.586 (seeds 0-3; the same on every kernel set and thread count measured by
# tests/learning_margins.py on 2026-11-28, docs/benchmarks.md "Learning tests' margins")
MIN_COPY_GAIN = 0.3


def _trainer(tmp_path, reward=copy_reward, service=None, **kw):
    return GRPOTrainer(train_config=grpo_train_config(tmp_path, **kw), reward_func=reward,
                       generation_service=service)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(loss_beta=0.05, kl_estimator="k3", grpo_batch_size=6, gradient_accumulation_steps=2, loss_type="dapo"),
    dict(loss_importance_sampling_level="sequence", loss_clip_eps=3e-4, loss_clip_eps_high=4e-4, grpo_epochs=2),
    dict(loss_type="cispo", loss_clip_eps_high=0.01, loss_delta=1.5),
])
def test_first_inner_step_ratio_is_exactly_one_and_clip_is_inactive(tmp_path, kw):
    tr = _trainer(tmp_path, **kw)
    window = next(tr.training_windows())
    sc = tr.stage_config
    for batch in window:
        b = tr.to_device(batch)
        m = b["completion_mask"] > 0
        logp = completion_logps(tr.model, b, tr.temperature)["logp"]
        assert torch.equal(logp[m], b["old_logp"][m])                      # bit for bit: ratio == 1
        clipped = tr.compute_loss(tr.model, b)
        assert clipped.extra["ratio_max"] == 1.0 and clipped.extra["clip_frac"] == 0.0
        assert clipped.extra["approx_kl"] == 0.0
        eps, hi, delta = sc.loss_clip_eps, sc.loss_clip_eps_high, sc.loss_delta
        sc.loss_clip_eps, sc.loss_clip_eps_high, sc.loss_delta = 1e9, 1e9, None   # no clipping at all
        try:
            unclipped = tr.compute_loss(tr.model, b)
        finally:
            sc.loss_clip_eps, sc.loss_clip_eps_high, sc.loss_delta = eps, hi, delta
        assert torch.equal(clipped.loss, unclipped.loss)
        if sc.loss_beta > 0:
            assert "ref_logp" in b
            torch.testing.assert_close(b["ref_logp"][m], b["old_logp"][m], atol=1e-5, rtol=0)  # ref = initial policy


def test_reference_not_built_when_beta_is_zero(tmp_path):
    assert _trainer(tmp_path / "a", loss_beta=0.0).reference is None
    assert isinstance(_trainer(tmp_path / "b", loss_beta=0.1).reference.frozen, torch.nn.Module)


@pytest.mark.parametrize("scale", [True, False])
def test_advantages_are_group_normalised(tmp_path, scale):
    tr = _trainer(tmp_path, scale_rewards=scale, group_size=4, batch_size=4)
    captured = {}
    orig = tr.sample

    def spy(batch):
        rollout, rewards = orig(batch)
        captured["rollout"], captured["total"] = rollout, rewards.total
        return rollout, rewards
    tr.sample = spy
    micro = tr.make_rollout_batches(tr.prompt_batches())
    r = captured["total"].reshape(-1, 4)
    expect = r - r.mean(1, keepdim=True)
    if scale:
        expect = expect / (r.std(1, keepdim=True) + 1e-4)
    got = torch.cat([b["advantages"] for b in micro])
    # micro-batches hold a shuffled order: compare as multisets per value
    assert torch.allclose(got.sort().values, expect.reshape(-1).sort().values, atol=1e-6)
    torch.testing.assert_close(group_advantages(captured["total"], 4, scale_std=scale), expect.reshape(-1))


def _fixed_service(completions):
    def service(model, prompts, config, group_size):
        return [completions[i % len(completions)] for i in range(len(prompts) * group_size)]
    return service


def test_aggregations_differ_and_match_hand_values_through_the_loop(tmp_path):
    """Fixed completions of unequal lengths (1..3 tokens) and one window of 2 micro-batches: the loop's loss equals
    the hand formula of each aggregation. At ratio 1 the per-token loss is -A."""
    comps = [[5, EOS], [6], [7, 8, EOS], [EOS], [4, 4], [9, 9, 9]]
    reward = lambda completion_ids: [float(len(c)) for c in completion_ids]   # noqa: E731
    losses = {}
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo"):
        tr = _trainer(tmp_path / lt, reward=reward, service=_fixed_service(comps), loss_type=lt, group_size=4,
                      batch_size=2, grpo_batch_size=4, gradient_accumulation_steps=2,
                      generate_config=GenerateConfig(max_new_tokens=3))
        window = next(tr.training_windows())
        assert len(window) == 2
        A = [b["advantages"] for b in window]
        M = [b["completion_mask"] for b in window]
        tok = [(-a[:, None] * m) for a, m in zip(A, M)]                  # per-token loss at ratio 1
        if lt == "cispo":                                                 # -sg(min(rho, 1 + eps)) A log pi, rho = 1
            tok = [t * b["old_logp"] for t, b in zip(tok, window)]
        if lt == "grpo":
            per_seq = torch.cat([(t.sum(1) / m.sum(1)) for t, m in zip(tok, M)])
            hand = per_seq.mean()
        elif lt == "bnpo":
            hand = torch.stack([t.sum() / m.sum() for t, m in zip(tok, M)]).mean()
        elif lt == "dr_grpo":
            hand = sum(t.sum() for t in tok) / (8 * 3)
        else:                                                             # dapo, cispo: window tokens
            hand = sum(t.sum() for t in tok) / sum(m.sum() for m in M)
        stats = tr.train_step(window)
        assert stats["loss"] == pytest.approx(float(hand), abs=1e-6), lt
        losses[lt] = stats["loss"]
    vals = list(losses.values())
    assert all(abs(a - b) > 1e-4 for i, a in enumerate(vals) for b in vals[i + 1:]), losses


def test_multiple_inner_epochs_reuse_the_buffer(tmp_path):
    tr = _trainer(tmp_path, grpo_epochs=3, grpo_batch_size=8, batch_size=4, steps=6)
    windows = tr.training_windows()
    first = [next(windows) for _ in range(6)]
    ids = [id(w[0]) for w in first]
    assert len(set(ids[:6])) == 2                     # one rollout = 2 micro-batches, reused by 3 epochs
    old = first[0][0]["old_logp"].clone()
    for w in first[:2]:
        tr.train_step(w)
    stats = tr.train_step(first[2])                   # second epoch: off-policy now, ratios move
    assert torch.equal(first[2][0]["old_logp"], old) or torch.equal(first[3][0]["old_logp"], old)
    assert stats["ratio_max"] > 1.0


def test_zero_variance_filtering_and_dynamic_sampling(tmp_path):
    # reward: the first sampled token (varies) for digits < 8, constant 1 otherwise -> those groups carry no signal
    def reward(completion_ids, answer_ids):
        return [1.0 if a[0] >= 8 else float(c[0] if c else 0) for c, a in zip(completion_ids, answer_ids)]
    tr = _trainer(tmp_path / "f", reward=reward, filter_zero_variance_groups=True, batch_size=8)
    micro = tr.make_rollout_batches(tr.prompt_batches())
    stats = tr.rollout_stats
    assert 0 < stats["kept_frac"] < 1 and stats["zero_var_group_frac"] == pytest.approx(1 - stats["kept_frac"])
    kept = sum(b["input_ids"].size(0) for b in micro)
    assert kept == round(stats["kept_frac"] * 32)
    for b in micro:                                   # no prompt with digit >= 8 survives
        assert all(int(row[b["prompt_len"] - 2]) < 8 for row in b["input_ids"])

    tr = _trainer(tmp_path / "d", reward=reward, dynamic_sampling=True, dynamic_sampling_max_rounds=4, batch_size=4)
    micro = tr.make_rollout_batches(tr.prompt_batches())
    assert tr.rollout_stats["sampling_rounds"] > 1
    assert sum(b["input_ids"].size(0) for b in micro) <= 4 * 4
    assert all(int(row[b["prompt_len"] - 2]) < 8 for b in micro for row in b["input_ids"])


def test_all_groups_filtered_skips_the_rollout(tmp_path):
    tr = _trainer(tmp_path, reward=lambda completion_ids: [1.0] * len(completion_ids),
                  filter_zero_variance_groups=True)
    assert tr.make_rollout_batches(tr.prompt_batches()) == []


def test_truncated_completions_masked_and_empty_completions_handled(tmp_path):
    comps = [[5, EOS], [6, 6, 6], [], [EOS]]                              # finished, truncated, empty, finished
    tr = _trainer(tmp_path, service=_fixed_service(comps), mask_truncated_completions=True, group_size=4,
                  batch_size=2, generate_config=GenerateConfig(max_new_tokens=3),
                  reward=lambda completion_ids: [float(len(c)) for c in completion_ids])
    window = next(tr.training_windows())
    b = window[0]
    P = b["prompt_len"]
    for row, m in zip(b["input_ids"], b["completion_mask"]):
        c = row[P:].tolist()
        if c[:3] == [6, 6, 6] or c[0] == tr.pad_token_id() and m.sum() == 0:
            assert m.sum() == 0                                           # truncated / empty: no loss tokens
    assert tr.rollout_stats["truncated_frac"] == pytest.approx(0.5)             # the empty one did not stop either
    stats = tr.train_step(window)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values() if isinstance(v, float))


def test_reward_errors_surface_with_the_function_name(tmp_path):
    def broken_reward(completion_ids):
        raise KeyError("answer")
    tr = _trainer(tmp_path / "a", reward=broken_reward)
    with pytest.raises(RewardFunctionError, match="'broken_reward' raised KeyError"):
        tr.train()

    def nan_reward(completion_ids):
        return [float("nan")] * len(completion_ids)
    tr = _trainer(tmp_path / "b", reward=[copy_reward, nan_reward])
    with pytest.raises(RewardFunctionError, match="'nan_reward' returned non-finite"):
        tr.train()


def measure_copy_task(out, seed: int) -> dict[str, float]:
    """100 GRPO steps on the copy task from a random tiny model: held-out greedy reward before and after."""
    cfg = grpo_train_config(out, n_items=1024, steps=100, batch_size=8, seed=seed, group_size=8, lr=2e-3)
    tr = GRPOTrainer(train_config=cfg, reward_func=copy_reward)
    held_out = copy_items(128, seed=100 + seed)
    before = tr.evaluate_rewards(held_out)["eval_reward"]
    tr.train()
    return {"before": before, "after": tr.evaluate_rewards(held_out)["eval_reward"]}


def test_grpo_learns_the_copy_task(tmp_path, capsys):
    """GRPO raises the held-out greedy reward of a random tiny model by a wide margin in 100 steps (the margin's
    measurements over seeds, threads and CPU kernels: tests/learning_margins.py, docs/benchmarks.md)."""
    results = {seed: measure_copy_task(tmp_path / str(seed), seed) for seed in (0, 1)}
    with capsys.disabled():
        for seed, r in results.items():
            print(f"\nGRPO copy task seed {seed}: held-out greedy reward {r['before']:.3f} -> {r['after']:.3f}")
    assert min(r["after"] - r["before"] for r in results.values()) > MIN_COPY_GAIN, results


def test_completions_stop_at_the_chat_templates_end_of_turn(tmp_path):
    """RL prompts are chat-rendered: `<|im_end|>` (not only the tokenizer's eos) ends a completion, so a completion
    that answers and closes its turn is *finished*, not truncated at max_new_tokens."""
    import json

    from llm_trainer.configs import GRPOConfig, OptimConfig, TrainConfig
    from llm_trainer.model import ModelConfig
    from llm_trainer.tokenizer import Tokenizer, train_tokenizer
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"{a}+1=?"},
                                                       {"role": "assistant", "content": str(a + 1)}]})
                              for a in range(20)))
    train_tokenizer([data], vocab_size=290, output_dir=tmp_path / "tok", template="chatml", show_progress=False)
    tok = Tokenizer(tmp_path / "tok")
    im_end = tok.token_to_id("<|im_end|>")
    assert im_end is not None and im_end != tok.eos_token_id
    prompt = tok.apply_chat_template([{"role": "user", "content": "3+1=?"}], add_generation_prompt=True).input_ids
    digit = tok.encode("4")
    comps = [digit + [im_end], digit + digit + digit]
    cfg = TrainConfig(model_config=ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, max_position_embeddings=64),
                      tokenizer=str(tmp_path / "tok"), file_dataset=[{"prompt_ids": torch.tensor(prompt)}] * 8,
                      batch_size=2, output_dir=str(tmp_path / "run"), optim_config=OptimConfig(initial_lr=1e-3),
                      save_interval=None, eval_interval=None, log_interval=1000, max_steps=1, dtype="fp32",
                      grpo_config=GRPOConfig(group_size=2, loss_beta=0.0,
                                             generate_config=GenerateConfig(max_new_tokens=3)))
    tr = GRPOTrainer(train_config=cfg, reward_func=lambda completion_ids: [float(len(c)) for c in completion_ids],
                     generation_service=_fixed_service(comps))
    assert im_end in tr.stop_token_ids() and tok.eos_token_id in tr.stop_token_ids()
    rollout, _ = tr.sample(tr.collate([tr.train_dataset[0], tr.train_dataset[1]]))
    assert rollout.finished == [True, False, True, False]
    assert rollout.completion_ids[0] == digit + [im_end]
