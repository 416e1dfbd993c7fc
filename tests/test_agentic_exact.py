"""Exact rollout log-probs (``old_logprobs="exact"``, llm_trainer.trainers.exact): under batch-invariant numerics
the log-probs recorded while decoding equal the trainer's full-forward log-probs bit for bit (CPU fp32, 1 and 2
threads, any micro-batch composition, with gradients), so the old-policy forward pass is skipped; without them the
gap is small but not zero (the floor this mode removes)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from agentic_helpers import CountdownEnv  # noqa: E402
from rl_helpers import copy_reward, grpo_train_config, ppo_train_config  # noqa: E402

from llm_trainer.generation import GenerateConfig, generate  # noqa: E402
from llm_trainer.model import LlmModel, ModelConfig  # noqa: E402
from llm_trainer.parallel.base import head_projection  # noqa: E402
from llm_trainer.trainers.exact import exact_generate, exact_numerics, exact_project, invariant_attention  # noqa: E402
from llm_trainer.trainers.grpo import GRPOTrainer  # noqa: E402
from llm_trainer.trainers.ppo import PPOTrainer  # noqa: E402
from llm_trainer.trainers.rollout import build_sequences, completion_logps  # noqa: E402


def _model(tied=True, vocab=150, hidden=32):
    torch.manual_seed(0)
    return LlmModel(ModelConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=128, eos_token_id=2, pad_token_id=0,
                                tie_word_embeddings=tied)).eval()


def _prompts(vocab, lengths=(5, 9, 7, 12, 30, 3)):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def test_invariant_attention_is_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(invariant_attention(q, k, v, is_causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))
    mask = torch.ones(2, 1, 7, 7, dtype=torch.bool).tril()
    mask[1, :, :, :3] = False                                            # left padding of row 1
    mask |= torch.eye(7, dtype=torch.bool)
    ours = invariant_attention(q, k[:, :2], v[:, :2], mask, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q, k[:, :2].repeat_interleave(2, 1), v[:, :2].repeat_interleave(2, 1),
                                         attn_mask=mask)
    torch.testing.assert_close(ours[0], ref[0])
    torch.testing.assert_close(ours[1, :, 3:], ref[1, :, 3:])           # the padding queries' outputs are unused


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tied,vocab,hidden", [(True, 150, 32), (False, 1000, 64)])
def test_decoding_log_probs_equal_the_full_forward_bit_for_bit(threads, tied, vocab, hidden):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        m = _model(tied, vocab, hidden)
        prompts = _prompts(vocab)
        project = exact_project(head_projection(m))
        with exact_numerics(m):
            comps, lps, _ = exact_generate(m, prompts, GenerateConfig(max_new_tokens=12, temperature=0.9), [2], 0,
                                           project, torch.Generator().manual_seed(1))
            for rows in ([0, 1, 2, 3, 4, 5], [5, 2, 0], [1], [4, 3]):     # any micro-batch composition
                b = build_sequences([prompts[i] for i in rows], [comps[i] for i in rows], 0)
                with torch.no_grad():
                    lp = completion_logps(m, b, 0.9, project=project)["logp"]
                for r, i in enumerate(rows):
                    assert torch.equal(lp[r, :len(comps[i])], lps[i]), (rows, i)
            m.train()                                                     # the update's forward, with gradients
            b = build_sequences(prompts, comps, 0)
            lp = completion_logps(m, b, 0.9, project=project)["logp"]
            assert all(torch.equal(lp[i, :len(c)].detach(), lps[i]) for i, c in enumerate(comps))
        assert not any("forward" in mod.__dict__ for mod in m.modules())   # restored
        assert all(getattr(mod, "attention_fn", None) is None for mod in m.modules())
    finally:
        torch.set_num_threads(old)


def test_default_numerics_differ_in_the_last_bits():
    """The floor without the exact mode: generation log-probs vs the recomputation differ by ~1e-6."""
    m = _model()
    prompts = _prompts(150)
    out = generate(m, prompts, GenerateConfig(max_new_tokens=12), eos_token_ids=[2], pad_token_id=0,
                   return_logprobs=True, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lp = completion_logps(m, build_sequences(prompts, out.completions, 0))["logp"]
    gap = max(float((lp[i, :len(c)] - out.logprobs[i]).abs().max()) for i, c in enumerate(out.completions))
    assert 0 < gap < 1e-4


@pytest.mark.parametrize("kw", [dict(), dict(loss_beta=0.04, grpo_batch_size=4, gradient_accumulation_steps=2,
                                              loss_type="dapo", grpo_epochs=2)])
def test_grpo_exact_mode_skips_the_old_forward_and_the_gap_is_zero(tmp_path, kw):
    tr = GRPOTrainer(train_config=grpo_train_config(tmp_path, steps=4, **kw), reward_func=copy_reward,
                     old_logprobs="exact")
    window = next(tr.training_windows())
    assert "time/old_logp" not in tr.rollout_stats
    for batch in window:                    # the first update's ratio is exactly 1: old = generation log-probs
        b = tr.to_device(batch)
        m = b["completion_mask"] > 0
        logp = tr.policy_logps(tr.model, b)["logp"]
        assert torch.equal(logp[m], b["old_logp"][m])
    stats = tr.train()
    assert stats["logprob_gap/max"] == 0.0 and stats["logprob_gap/kl"] == 0.0 and "time/old_logp" not in stats


def test_exact_mode_multi_turn_and_ppo(tmp_path):
    from test_agentic_trainer import _config  # the multi-turn trainer settings
    from agentic_helpers import chatml_tokenizer
    chatml_tokenizer(tmp_path / "tok")
    tr = GRPOTrainer(train_config=_config(tmp_path / "grpo", str(tmp_path / "tok" / "tok")),
                     environment=lambda: CountdownEnv(3), old_logprobs="exact")
    stats = tr.train()
    assert stats["env/turns"] > 1 and stats["logprob_gap/max"] == 0.0
    tr = PPOTrainer(train_config=ppo_train_config(tmp_path / "ppo", steps=2), reward_func=copy_reward,
                    old_logprobs="exact")
    stats = tr.train()                      # PPO still runs the forward for its values: the gap is measured there
    assert stats["logprob_gap/max"] == 0.0 and "time/old_logp" in stats


def test_exact_mode_refuses_what_it_cannot_make_exact(tmp_path):
    with pytest.raises(ValueError, match="top_k, top_p, repetition_penalty and suppress_tokens"):
        GRPOTrainer(train_config=grpo_train_config(tmp_path / "a", generate_config=GenerateConfig(
            max_new_tokens=3, top_k=5)), reward_func=copy_reward, old_logprobs="exact")
    with pytest.raises(ValueError, match="needs the built-in engine"):
        GRPOTrainer(train_config=grpo_train_config(tmp_path / "b"), reward_func=copy_reward, old_logprobs="exact",
                    generation_service=lambda *a: None)
