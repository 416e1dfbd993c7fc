"""The continuous-batching engine in-process: sequences that join a running batch at different times, with mixed
greedy / sampled / repetition-penalty settings, produce exactly the tokens of `generate` on each prompt alone
(with the same seed) — for a dense model large enough for the packed-weight CPU path, an MoE model, a model with
dynamic NTK RoPE past its trained length, and tied embeddings. Cancelling a row and a failing batch leave the
others untouched."""
from __future__ import annotations

import queue

import pytest
import torch

from llm_trainer.generation import GenerateConfig, generate
from llm_trainer.model import LlmModel, ModelConfig, MoEConfig, RoPEScalingConfig
from llm_trainer.serve.engine import BatchEngine, Sequence
from llm_trainer.serve.loading import Prompt, ServedModel

VARIANTS = {
    "dense_packed": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2),
    "moe": dict(moe=MoEConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "dynamic_rope": dict(max_position_embeddings=24, rope_scaling=RoPEScalingConfig(rope_type="dynamic", factor=2.0)),
    "tied": dict(tie_word_embeddings=True),
}
CONFIGS = [GenerateConfig(max_new_tokens=18, do_sample=False),
           GenerateConfig(max_new_tokens=25, temperature=0.9, top_k=20, top_p=0.9),
           GenerateConfig(max_new_tokens=9, do_sample=False, repetition_penalty=1.4, suppress_tokens=[3, 4]),
           GenerateConfig(max_new_tokens=30, temperature=1.2, repetition_penalty=1.2),
           GenerateConfig(max_new_tokens=14, do_sample=False),
           GenerateConfig(max_new_tokens=22, temperature=0.7)]


def served_model(variant: str) -> ServedModel:
    torch.manual_seed(0)
    base = dict(vocab_size=160, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False, eos_token_id=None)
    model = LlmModel(ModelConfig(**{**base, **VARIANTS[variant]})).eval()
    return ServedModel(kind="llm", model=model, tokenizer=None, name=variant, max_model_len=256)


def _collect(seq: Sequence) -> tuple[list[int], str]:
    tokens = []
    while True:
        _, kind, value = seq.events.get(timeout=120)
        if kind == "token":
            tokens.append(value)
        else:
            return tokens, value


def _alone(served, seq: Sequence) -> list[int]:
    gen = None if seq.config.greedy else torch.Generator().manual_seed(seq.seed)
    return generate(served.model, [seq.prompt.ids], seq.config, eos_token_ids=sorted(seq.stop_ids),
                    generator=gen).completions[0]


def _seq(i: int, prompt: list[int], stop=frozenset()) -> Sequence:
    return Sequence(Prompt(prompt), CONFIGS[i % len(CONFIGS)], frozenset(stop), queue.SimpleQueue(), seed=1000 + i)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_joining_sequences_equal_generate_alone(variant):
    served = served_model(variant)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 160, (n,), generator=g).tolist() for n in (5, 12, 3, 9, 16, 7, 11, 4)]
    seqs = [_seq(i, p, stop={7} if i == 4 else ()) for i, p in enumerate(prompts)]
    engine = BatchEngine(served, max_batch=5).start()
    try:
        engine.submit(seqs[:2])
        for s in seqs[:2]:  # both have produced tokens: the batch is running when the others arrive
            assert s.events.get(timeout=120)[1] == "token"
        engine.submit(seqs[2:5])
        engine.submit(seqs[5:])  # more than max_batch: these wait for free slots
        results = [_collect(s) for s in seqs]
    finally:
        engine.close()
    for i, (s, (tokens, reason)) in enumerate(zip(seqs, results)):
        expected = _alone(served, s)
        if i < 2:
            tokens = expected[:1] + tokens  # the first token was read above
        assert tokens == expected, f"sequence {i}"
        assert reason == ("stop" if expected[-1] in s.stop_ids else "length")
    assert engine.stats["peak_batch"] == 5 and engine.stats["completed"] == len(seqs)


def test_cancel_and_failure_leave_other_rows_exact():
    served = served_model("dense_packed")
    keep = _seq(0, [1, 2, 3, 4])
    keep.config = GenerateConfig(max_new_tokens=40, do_sample=False)
    dropped = _seq(4, [9, 8, 7])
    dropped.config = GenerateConfig(max_new_tokens=200, do_sample=False)
    engine = BatchEngine(served, max_batch=4).start()
    try:
        engine.submit([keep, dropped])
        assert dropped.events.get(timeout=120)[1] == "token"
        engine.cancel(dropped)
        bad = _seq(1, [5, 10_000])  # an id outside the vocabulary: its prefill fails
        engine.submit([bad])
        assert _collect(bad)[1].startswith("generation failed: ValueError: token id 10000")
        tokens, reason = _collect(keep)
        late = _seq(2, [6, 6, 6])
        engine.submit([late])
        late_tokens, _ = _collect(late)
    finally:
        engine.close()
    assert tokens == _alone(served, keep) and reason == "length"
    assert late_tokens == _alone(served, late)
    assert engine.stats["cancelled"] == 1 and engine.stats["failed"] == 1
    assert len(dropped.tokens) < 200
