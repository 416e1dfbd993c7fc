"""Rollout engine and rewards: grouped prefill == per-sample generation, chunking, services, reward errors."""
from __future__ import annotations

import math

import pytest
import torch

from llm_trainer.generation import GenerateConfig, generate
from llm_trainer.model import LlmModel
from llm_trainer.parallel import SingleBackend
from llm_trainer.trainers.reference import eval_mode
from llm_trainer.trainers.rewards import RewardFunctionError, RewardSet
from llm_trainer.trainers.rollout import (GenerationResult, Rollout, RolloutEngine, build_sequences, completion_logps,
                                          disable_stochasticity)
from rl_helpers import EOS, PAD, model_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = LlmModel(model_config(vocab_size=32, hidden_size=48))
    return m.eval()


PROMPTS = [[1, 5, 6, 7], [1, 9], [1, 3, 4, 8, 10, 11]]   # different lengths: left padding in the batch


def _engine(config, group_size=1, chunk=None, service=None):
    return RolloutEngine(SingleBackend("fp32", device="cpu"), config, [EOS], PAD, group_size=group_size,
                         chunk_size=chunk, service=service, vocab_size=32)


def test_grouped_prefill_equals_each_sample_alone_greedy(model):
    cfg = GenerateConfig(max_new_tokens=6, do_sample=False)
    grouped = _engine(cfg, group_size=3).generate(model, PROMPTS)
    k = 0
    for p in PROMPTS:
        alone = generate(model, [p], cfg, eos_token_ids=[EOS], pad_token_id=PAD, return_logprobs=True)
        for _ in range(3):
            assert grouped.completions[k] == alone.completions[0]
            torch.testing.assert_close(grouped.logprobs[k], alone.logprobs[0], atol=1e-5, rtol=0)
            assert grouped.finished[k] == alone.finished[0]
            k += 1


def test_grouped_sampling_logprobs_match_a_full_forward(model):
    """Sampled with temperature: the recorded log-probs equal log softmax(logits / T) of a full forward pass of
    each sample alone (so the importance ratio of the first update is 1 up to float noise; the trainers use the
    recomputed ones, exactly 1)."""
    cfg = GenerateConfig(max_new_tokens=8, temperature=0.7)
    res = _engine(cfg, group_size=4).generate(model, PROMPTS, torch.Generator().manual_seed(3))
    assert len(res.completions) == 12
    assert len({tuple(c) for c in res.completions}) > 3          # samples of a group differ
    prompts = [p for p in PROMPTS for _ in range(4)]
    for i, (p, c) in enumerate(zip(prompts, res.completions)):
        b = build_sequences([p], [c], PAD)
        with torch.no_grad():
            lp = completion_logps(model, b, 0.7)["logp"][0, :len(c)]
        torch.testing.assert_close(lp, res.logprobs[i], atol=2e-5, rtol=0)


def test_chunked_rollout_equals_unchunked(model):
    cfg = GenerateConfig(max_new_tokens=5, do_sample=False)
    full = _engine(cfg, group_size=2).generate(model, PROMPTS)
    chunked = _engine(cfg, group_size=2, chunk=2).generate(model, PROMPTS)   # one prompt (2 samples) per chunk
    assert full.completions == chunked.completions
    assert full.finished == chunked.finished


def test_generation_service_protocol_and_stop_handling(model):
    calls = []

    def service(m, prompts, config, group_size):
        calls.append((len(prompts), group_size))
        return [[4, 5, EOS, 7, 7], [], [6] * 20, [EOS]] [:len(prompts) * group_size]

    res = _engine(GenerateConfig(max_new_tokens=4), group_size=2, service=service).generate(model, PROMPTS[:2])
    assert calls == [(2, 2)]
    assert res.completions == [[4, 5, EOS], [], [6, 6, 6, 6], [EOS]]   # cut after the stop id, at max_new_tokens
    assert res.finished == [True, False, False, True]
    assert res.logprobs is None

    def returns_result(m, prompts, config, group_size):
        return GenerationResult([[4]] * len(prompts), [torch.tensor([-0.5])] * len(prompts), [True] * len(prompts))
    res = _engine(GenerateConfig(max_new_tokens=4), service=returns_result).generate(model, PROMPTS)
    assert res.finished == [True] * 3 and float(res.logprobs[0][0]) == -0.5

    def wrong(m, prompts, config, group_size):
        return [[4]]
    with pytest.raises(ValueError, match="'wrong' returned 1 completions"):
        _engine(GenerateConfig(max_new_tokens=4), service=wrong).generate(model, PROMPTS)

    def out_of_vocab(m, prompts, config, group_size):
        return [[99]] * len(prompts)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        _engine(GenerateConfig(max_new_tokens=4), service=out_of_vocab).generate(model, PROMPTS)


def _rollout(completions, answers=None):
    n = len(completions)
    return Rollout(prompt_ids=[[1, 2]] * n, completion_ids=completions, finished=[True] * n, group=list(range(n)),
                   answer_ids=[None] * n, answer_text=answers or [None] * n, prompt_text=["p"] * n,
                   completion_text=[" ".join(map(str, c)) for c in completions])


def test_reward_set_weights_dense_and_metrics():
    def length(completion_ids):
        return [float(len(c)) for c in completion_ids]

    def per_token(completion_ids, **kwargs):
        assert {"prompts", "completions", "answers", "finished"} <= set(kwargs)
        return [[0.5] * len(c) for c in completion_ids]

    class RM:
        def score(self, prompt_ids, completion_ids):
            return torch.tensor([10.0 * len(p) for p in prompt_ids])

    rs = RewardSet([length, per_token, RM()], weights=[2.0, 1.0, 0.1])
    assert rs.names == ["length", "per_token", "RM"]
    out = rs(_rollout([[3, 4, 5], [6], []]))                      # an empty completion is fine
    torch.testing.assert_close(out.scores, torch.tensor([6.0 + 2, 2.0 + 2, 0.0 + 2]))
    assert [d.tolist() for d in out.dense] == [[0.5, 0.5, 0.5], [0.5], []]
    torch.testing.assert_close(out.total, torch.tensor([9.5, 4.5, 2.0]))
    m = rs.metrics(out)
    assert m["reward/length/mean"] == pytest.approx(4 / 3) and m["reward/per_token/mean"] == pytest.approx(2 / 3)
    assert m["reward/mean"] == pytest.approx(16 / 3)

    with pytest.raises(ValueError, match="2 entries for 3"):
        RewardSet([length, per_token, RM()], weights=[1.0, 1.0])


@pytest.mark.parametrize("bad, match", [
    (lambda completion_ids: 1 / 0, "'bad_fn' raised ZeroDivisionError"),
    (lambda completion_ids: [1.0] * (len(completion_ids) - 1), "'bad_fn' returned 2 values for 3 completions"),
    (lambda completion_ids: [1.0, math.nan, 0.0], r"'bad_fn' returned non-finite values \(NaN/inf\) for completions \[1\]"),
    (lambda completion_ids: [[1.0]] * 3, "'bad_fn': dense reward 0 has 1 values for a completion of 2 tokens"),
    (lambda completion_ids: None, "'bad_fn' returned None"),
    (lambda completion_ids: ["x", "y", "z"], "'bad_fn' returned values that are not numbers"),
])
def test_reward_errors_name_the_function(bad, match):
    bad.__name__ = "bad_fn"

    def fine(completion_ids):
        return [0.0] * len(completion_ids)
    with pytest.raises(RewardFunctionError, match=match):
        RewardSet([fine, bad])(_rollout([[3, 4], [5], [6, 7]]))


def test_disable_stochasticity_makes_train_forward_equal_eval():
    torch.manual_seed(0)
    m = LlmModel(model_config(hidden_dropout=0.3, attention_dropout=0.3))
    b = build_sequences([[1, 4, 5]], [[6, 7]], PAD)
    with eval_mode(m), torch.no_grad():
        ref = completion_logps(m, b)["logp"]
    m.train()
    assert not torch.equal(completion_logps(m, b)["logp"], ref)          # dropout on
    disable_stochasticity(m)
    assert torch.equal(completion_logps(m, b)["logp"], ref)
    assert m.training


def test_reward_model_of_the_reward_trainer_is_a_reward_source():
    """A `RewardModel` (an nn.Module, so callable) is scored through ``.score``, not called like a function."""
    from llm_trainer.model.reward import RewardModel
    torch.manual_seed(0)
    rm = RewardModel(model_config(), head_init_std=0.5).eval()
    rs = RewardSet([rm, lambda completion_ids: [1.0] * len(completion_ids)], weights=[2.0, 1.0])
    r = _rollout([[3, 4], [5], [6, 7, 8]])
    out = rs(r)
    expect = rm.score(r.prompt_ids, r.completion_ids)
    assert expect.abs().max() > 0 and not torch.equal(expect[0], expect[1])
    torch.testing.assert_close(out.scores, 2.0 * expect + 1.0)
    torch.testing.assert_close(out.per_function["RewardModel"], expect)
