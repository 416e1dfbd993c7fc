"""Generation: KV-cache greedy == no-cache recomputation (dense, MoE, ragged batches), grouped prefill, sampling
semantics, and logits processing checked by hand on a fixed-logit toy model."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from llm_trainer.generation import GenerateConfig, GenerationOutput, generate, process_logits, streaming_generate
from llm_trainer.model import LlmModel, ModelConfig, MoEConfig

PROMPTS = [[5, 17, 3], [9, 2, 44, 61, 8, 8, 30], [100], [7, 7, 7, 7, 12]]


def _model(moe: bool = False, seed: int = 0) -> LlmModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1,
                      moe=MoEConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32) if moe else None)
    return LlmModel(cfg).eval()


@pytest.fixture(scope="module")
def dense():
    return _model(False)


@pytest.fixture(scope="module")
def moe():
    return _model(True)


@torch.no_grad()
def _naive_greedy(model, prompt, n, eos=()):
    """Full recomputation of the whole sequence at every step, one prompt at a time, no cache."""
    ids, lps = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        tok = int(logits.argmax())
        lps.append(float(logits.log_softmax(-1)[tok]))
        ids.append(tok)
        if tok in eos:
            break
    return ids[len(prompt):], lps


GREEDY = GenerateConfig(max_new_tokens=12, do_sample=False)


# -------------------------------------------------------------------------------------------------- config
def test_config_validation():
    assert GenerateConfig().greedy is False
    assert GenerateConfig(temperature=0).greedy and GenerateConfig(do_sample=False).greedy
    assert GenerateConfig(top_k=0).top_k is None
    assert GenerateConfig(stop_token_ids=3).stop_token_ids == [3]
    for bad in (dict(max_new_tokens=0), dict(max_new_tokens=1.5), dict(top_p=0.0), dict(top_p=1.1),
                dict(top_k=-1), dict(repetition_penalty=0), dict(suppress_tokens=[-1]), dict(stop_token_ids=["a"]),
                dict(temperature=float("nan"))):
        with pytest.raises(ValueError, match="GenerateConfig"):
            GenerateConfig(**bad)


# ------------------------------------------------------------------------------- cache == recomputation
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_kv_cache_greedy_equals_recomputation(kind, dense, moe):
    model = dense if kind == "dense" else moe
    out = generate(model, PROMPTS, GREEDY, eos_token_ids=[], pad_token_id=0, return_logprobs=True)
    assert isinstance(out, GenerationOutput) and len(out) == len(PROMPTS)
    assert out.sequences.shape == (4, 7 + 12) and out.prompt_length == 7
    for i, p in enumerate(PROMPTS):
        ref, ref_lp = _naive_greedy(model, p, 12)
        assert out.completions[i] == ref, f"row {i}"
        torch.testing.assert_close(out.logprobs[i], torch.tensor(ref_lp), atol=1e-4, rtol=0)
        # sequences: left-padded prompt then the completion
        assert out.sequences[i].tolist() == [0] * (7 - len(p)) + p + ref
        assert out.attention_mask[i].tolist() == [0] * (7 - len(p)) + [1] * (len(p) + 12)
    assert out.finished == [False] * 4


def test_stop_rows_stop_growing(dense):
    free, _ = _naive_greedy(dense, PROMPTS[1], 12)
    stop = free[4]  # a token row 1 emits at step 5
    out = generate(dense, PROMPTS, GREEDY, eos_token_ids=[stop], pad_token_id=0)
    for i, p in enumerate(PROMPTS):
        ref, _ = _naive_greedy(dense, p, 12, eos=(stop,))
        assert out.completions[i] == ref
        assert out.finished[i] == (ref[-1] == stop)
        row = out.sequences[i, out.prompt_length:].tolist()
        assert row[:len(ref)] == ref and all(t == 0 for t in row[len(ref):])
    assert out.finished[1] and len(out.completions[1]) <= 5
    # model.config.eos_token_id is the default stop set
    dense.config.eos_token_id = stop
    try:
        assert generate(dense, PROMPTS, GREEDY, pad_token_id=0).completions == out.completions
    finally:
        dense.config.eos_token_id = None


def test_all_finished_ends_early(dense):
    first = _naive_greedy(dense, PROMPTS[2], 1)[0][0]
    out = generate(dense, [PROMPTS[2]] * 3, GenerateConfig(max_new_tokens=50, do_sample=False),
                   eos_token_ids=[first])
    assert out.completions == [[first]] * 3 and out.finished == [True] * 3
    assert out.sequences.shape[1] == 1 + 1  # prompt + one step: the loop stopped


# ------------------------------------------------------------------------------------------ grouped prefill
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_group_prefill_equals_each_alone(kind, dense, moe):
    model = dense if kind == "dense" else moe
    grouped = generate(model, PROMPTS[:3], GREEDY, eos_token_ids=[], group_size=3, return_logprobs=True)
    assert len(grouped) == 9
    for i, p in enumerate(PROMPTS[:3]):
        alone = generate(model, [p], GREEDY, eos_token_ids=[], return_logprobs=True)
        for j in range(3):
            assert grouped.completions[3 * i + j] == alone.completions[0]
            torch.testing.assert_close(grouped.logprobs[3 * i + j], alone.logprobs[0], atol=1e-5, rtol=0)


def test_group_prefill_sampling_equals_repeated_prompts(dense):
    cfg = GenerateConfig(max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.95)
    g = generate(dense, PROMPTS[:2], cfg, eos_token_ids=[], group_size=4, return_logprobs=True,
                 generator=torch.Generator().manual_seed(3))
    rep = [p for p in PROMPTS[:2] for _ in range(4)]
    r = generate(dense, rep, cfg, eos_token_ids=[], return_logprobs=True, generator=torch.Generator().manual_seed(3))
    assert g.completions == r.completions
    for a, b in zip(g.logprobs, r.logprobs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert len({tuple(c) for c in g.completions[:4]}) > 1  # the group's samples differ


def test_group_prefill_with_repetition_penalty_and_ragged_prompts(dense):
    """Regression: the padding mask was repeated for the group twice when the repetition penalty built its
    seen-token mask (a shape error); the penalty must see each row's own prompt, padding excluded."""
    cfg = GenerateConfig(max_new_tokens=8, do_sample=False, repetition_penalty=1.5)
    g = generate(dense, PROMPTS[:2], cfg, eos_token_ids=[], group_size=2, return_logprobs=True)
    r = generate(dense, [p for p in PROMPTS[:2] for _ in range(2)], cfg, eos_token_ids=[], return_logprobs=True)
    assert g.completions == r.completions
    for a, b in zip(g.logprobs, r.logprobs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------- sampling
def test_top_k_1_equals_greedy_and_seeding(dense):
    greedy = generate(dense, PROMPTS, GREEDY, eos_token_ids=[])
    k1 = generate(dense, PROMPTS, GenerateConfig(max_new_tokens=12, temperature=1.3, top_k=1), eos_token_ids=[],
                  return_logprobs=True, generator=torch.Generator().manual_seed(0))
    assert k1.completions == greedy.completions
    assert all(torch.all(lp == 0) for lp in k1.logprobs)  # a point mass
    cfg = GenerateConfig(max_new_tokens=12, temperature=1.0)
    a = generate(dense, PROMPTS, cfg, eos_token_ids=[], generator=torch.Generator().manual_seed(7))
    b = generate(dense, PROMPTS, cfg, eos_token_ids=[], generator=torch.Generator().manual_seed(7))
    c = generate(dense, PROMPTS, cfg, eos_token_ids=[], generator=torch.Generator().manual_seed(8))
    assert a.completions == b.completions != c.completions


def test_sampling_logprobs_equal_recomputed_processed_distribution(dense):
    cfg = GenerateConfig(max_new_tokens=6, temperature=0.7, top_k=10, top_p=0.9, repetition_penalty=1.3)
    out = generate(dense, PROMPTS, cfg, eos_token_ids=[], return_logprobs=True,
                   generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            ids = list(p)
            for t, tok in enumerate(out.completions[i]):
                logits = dense(torch.tensor([ids])).logits[0, -1].double()
                for s in set(ids):  # repetition penalty by hand
                    logits[s] = logits[s] / 1.3 if logits[s] > 0 else logits[s] * 1.3
                scores = logits / 0.7
                top = scores.topk(10)
                probs = top.values.softmax(-1)
                keep = (probs.cumsum(-1) - probs) < 0.9
                kept = top.indices[keep].tolist()
                assert tok in kept
                lp = float(top.values[keep][kept.index(tok)] - torch.logsumexp(top.values[keep], -1))
                assert abs(float(out.logprobs[i][t]) - lp) < 1e-4
                ids.append(tok)


# ------------------------------------------------------------------------------------------- fixed-logit toy
L = [0.0, 3.0, 2.5, -1.0, 1.0]


class ConstantModel(nn.Module):
    """Every position's next-token logits are L, whatever the input (no `return_hidden_states`, no cache)."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(eos_token_id=None, pad_token_id=None)
        self.calls = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        self.calls.append(tuple(input_ids.shape))
        logits = torch.tensor(L).expand(*input_ids.shape, len(L))
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)


def test_repetition_penalty_by_hand():
    m = ConstantModel()
    out = generate(m, [[3], [4, 2]], GenerateConfig(max_new_tokens=4, do_sample=False, repetition_penalty=2.0),
                   eos_token_ids=[], pad_token_id=0, return_logprobs=True)
    # row 0, seen {3}: [0, 3, 2.5, -2, 1] -> 1; seen {3,1}: [0, 1.5, 2.5, -2, 1] -> 2; seen {1,2,3}: [0,1.5,1.25,-2,1] -> 1
    # row 1, seen {4,2}: [0, 3, 1.25, -1, .5] -> 1; then [0, 1.5, 1.25, -1, .5] -> 1 ...
    assert out.completions == [[1, 2, 1, 1], [1, 1, 1, 1]]
    lse = math.log(sum(math.exp(x) for x in [0, 3, 2.5, -2, 1]))
    assert abs(float(out.logprobs[0][0]) - (3 - lse)) < 1e-6
    lse = math.log(sum(math.exp(x) for x in [0, 1.5, 2.5, -2, 1]))
    assert abs(float(out.logprobs[0][1]) - (2.5 - lse)) < 1e-6
    # the padding id (0) of row 0 is not "seen": only real prompt tokens are penalised
    seen = torch.zeros(1, 5, dtype=torch.bool)
    seen[0, [0, 1]] = True
    got = process_logits(torch.tensor([[0.5, -2.0, 1.0, 1.0, 1.0]]), GenerateConfig(repetition_penalty=2.0), seen)
    assert got.tolist() == [[0.25, -4.0, 1.0, 1.0, 1.0]]


def test_suppress_and_stop_by_hand():
    m = ConstantModel()
    out = generate(m, [[3]], GenerateConfig(max_new_tokens=3, do_sample=False, suppress_tokens=[1]),
                   eos_token_ids=[])
    assert out.completions == [[2, 2, 2]]
    out = generate(m, [[3]], GenerateConfig(max_new_tokens=3, do_sample=False, suppress_tokens=[1, 2]),
                   eos_token_ids=[])
    assert out.completions == [[4, 4, 4]]
    # several stop ids (config + eos): row 0 stops at 2 (step 2), row 1 never stops
    cfg = GenerateConfig(max_new_tokens=5, do_sample=False, repetition_penalty=2.0, stop_token_ids=[2])
    out = generate(m, [[3], [4, 2]], cfg, eos_token_ids=[0], pad_token_id=0)
    assert out.completions == [[1, 2], [1, 1, 1, 1, 1]]
    assert out.finished == [True, False]
    assert out.sequences.tolist() == [[0, 3, 1, 2, 0, 0, 0], [4, 2, 1, 1, 1, 1, 1]]
    assert out.attention_mask.tolist() == [[0, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]]
    # one prefill of the padded batch, then one single-token step per generated token but the last
    assert m.calls[-5:] == [(2, 2), (2, 1), (2, 1), (2, 1), (2, 1)]


def test_sampling_distribution_top_p_temperature():
    """4000 samples of one step: frequencies and log-probs follow softmax(L / T) restricted to the top-p set."""
    m = ConstantModel()
    T, top_p = 2.0, 0.8
    out = generate(m, [[3]], GenerateConfig(max_new_tokens=1, temperature=T, top_p=top_p), eos_token_ids=[],
                   group_size=4000, return_logprobs=True, generator=torch.Generator().manual_seed(0))
    z = [math.exp(x / T) for x in L]
    p = [v / sum(z) for v in z]
    order = sorted(range(5), key=lambda i: -p[i])
    kept, mass = [], 0.0
    for i in order:  # smallest set whose mass reaches top_p
        if mass >= top_p:
            break
        kept.append(i)
        mass += p[i]
    q = {i: p[i] / mass for i in kept}
    assert sorted(kept) == [1, 2, 4]
    counts = {i: 0 for i in range(5)}
    for c, lp in zip(out.completions, out.logprobs):
        counts[c[0]] += 1
        assert abs(float(lp[0]) - math.log(q[c[0]])) < 1e-5
    for i in range(5):
        assert abs(counts[i] / 4000 - q.get(i, 0.0)) < 0.03, (i, counts)


# ------------------------------------------------------------------------------------------------- plumbing
def test_training_mode_restored_and_outputs_are_plain_tensors(dense):
    dense.train()
    dense.model.layers[0].eval()  # a mixed state is restored exactly
    try:
        out = generate(dense, PROMPTS[:2], GenerateConfig(max_new_tokens=3), eos_token_ids=[], return_logprobs=True)
        assert dense.training and not dense.model.layers[0].training and dense.model.layers[1].training
        assert not out.sequences.is_inference() and not out.logprobs[0].is_inference()
        loss = dense(out.sequences, attention_mask=out.attention_mask).logits.sum()  # usable with autograd
        loss.backward()
    finally:
        dense.zero_grad(set_to_none=True)
        dense.eval()


def test_streaming_matches_generate(dense):
    ref = generate(dense, [PROMPTS[1]], GREEDY, eos_token_ids=[]).completions[0]
    dense.train()
    stream = streaming_generate(dense, PROMPTS[1], GREEDY, eos_token_ids=[])
    first = next(stream)
    assert not dense.training and not torch.is_inference_mode_enabled()  # no mode leaks between yields
    assert [first] + list(stream) == ref
    assert dense.training
    dense.eval()
    stop = ref[3]
    got = list(streaming_generate(dense, PROMPTS[1], GREEDY, eos_token_ids=[stop]))
    assert got == ref[:ref.index(stop) + 1]


def test_bad_inputs(dense):
    with pytest.raises(ValueError, match="non-empty"):
        generate(dense, [], GREEDY)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(dense, [[1], []], GREEDY)
    with pytest.raises(TypeError, match="not a tensor"):
        generate(dense, torch.tensor([[1, 2]]), GREEDY)
    with pytest.raises(ValueError, match="group_size"):
        generate(dense, [[1]], GREEDY, group_size=0)
    with pytest.raises(ValueError, match="out of range"):
        generate(dense, [[1, 500]], GREEDY)


def test_cpu_prepacked_linears_match_plain_path(monkeypatch):
    """The CPU fast path (oneDNN-packed weights during one call) gives the plain path's results and leaves the
    model untouched; tied and untied output projections."""
    import llm_trainer.cpu_prepack as gen

    if not gen.prepack_supported():
        pytest.skip("oneDNN linear packing not available in this torch build")
    real = gen.packed_linear
    for tie in (False, True):
        torch.manual_seed(0)
        model = LlmModel(ModelConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, initializer_range=0.1, tie_word_embeddings=tie)).eval()
        cfg = GenerateConfig(max_new_tokens=20, do_sample=False)
        monkeypatch.setattr(gen, "CPU_PREPACK_MIN_NUMEL", None)
        plain = generate(model, PROMPTS, cfg, eos_token_ids=[], return_logprobs=True)
        monkeypatch.setattr(gen, "CPU_PREPACK_MIN_NUMEL", 1)
        calls = []
        monkeypatch.setattr(gen, "packed_linear", lambda *a: calls.append(1) or real(*a))
        packed = generate(model, PROMPTS, cfg, eos_token_ids=[], return_logprobs=True)
        assert calls, "the packed path was not used"
        assert packed.completions == plain.completions
        for a, b in zip(packed.logprobs, plain.logprobs):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        assert not any("forward" in m.__dict__ for m in model.modules())  # forwards restored
        # weights changed behind the tensor's version counter are still seen (nothing is cached across calls)
        with torch.no_grad():
            for p in model.parameters():
                p.data.copy_(p.data * 1.5)
        monkeypatch.setattr(gen, "CPU_PREPACK_MIN_NUMEL", None)
        want = generate(model, PROMPTS, cfg, eos_token_ids=[])
        monkeypatch.setattr(gen, "CPU_PREPACK_MIN_NUMEL", 1)
        assert generate(model, PROMPTS, cfg, eos_token_ids=[]).completions == want.completions


# ----------------------------------------------------------------------------------------- static cache / compile
SAMPLED = GenerateConfig(max_new_tokens=12, temperature=0.9, top_k=30, top_p=0.95, repetition_penalty=1.2)


def _static(cfg: GenerateConfig, **kw) -> GenerateConfig:
    return GenerateConfig(**{**cfg.__dict__, "static_cache": True, **kw})


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("cfg", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("group_size", [1, 3])
def test_static_cache_same_tokens_as_default_path(kind, cfg, group_size, dense, moe):
    """Ragged (left-padded) prompts; seeded sampling draws the same tokens; logprobs within 1e-5."""
    model = dense if kind == "dense" else moe

    def run(c):
        return generate(model, PROMPTS, c, eos_token_ids=[], group_size=group_size, return_logprobs=True,
                        generator=torch.Generator().manual_seed(5))

    want, got = run(cfg), run(_static(cfg))
    assert got.completions == want.completions
    assert torch.equal(got.sequences, want.sequences) and torch.equal(got.attention_mask, want.attention_mask)
    for a, b in zip(got.logprobs, want.logprobs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_static_cache_unpadded_stop_tokens_and_streaming(dense):
    prompts = [[5, 17, 3], [9, 2, 44]]  # no padding: the default path attends without a mask
    free = generate(dense, prompts, GREEDY, eos_token_ids=[])
    stop = free.completions[0][3]
    want = generate(dense, prompts, GREEDY, eos_token_ids=[stop])
    got = generate(dense, prompts, _static(GREEDY), eos_token_ids=[stop])
    assert got.completions == want.completions and got.finished == want.finished
    assert list(streaming_generate(dense, prompts[1], _static(GREEDY), eos_token_ids=[])) == free.completions[1]


def test_static_cache_needs_a_plain_llm_model():
    class Wrapped(LlmModel):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    model = Wrapped(_model().config).eval()
    with pytest.raises(ValueError, match="static_cache/compile needs a plain LlmModel, got Wrapped"):
        generate(model, PROMPTS, _static(GREEDY))
    with pytest.raises(ValueError, match="GenerateConfig.compile must be a bool"):
        GenerateConfig(compile="yes")


@pytest.mark.slow
def test_compiled_static_step_same_tokens_and_buffers_reused(dense):
    """torch.compile(mode="reduce-overhead") of the static step (on CPU: inductor C++, no CUDA graphs): same
    tokens as the default path; a second call with the same shapes reuses the model's static buffers."""
    import llm_trainer.generation as gen

    want = generate(dense, PROMPTS, GREEDY, eos_token_ids=[], return_logprobs=True)
    compiled = GenerateConfig(max_new_tokens=12, do_sample=False, compile=True)
    got = generate(dense, PROMPTS, compiled, eos_token_ids=[], return_logprobs=True)
    assert got.completions == want.completions
    for a, b in zip(got.logprobs, want.logprobs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    buffers = gen._STATIC_CACHES[dense]
    assert buffers.keys[0].shape[2] == 32  # 7 + 12 rounded up to a power of two
    again = generate(dense, PROMPTS[::-1], compiled, eos_token_ids=[])
    assert gen._STATIC_CACHES[dense] is buffers
    assert again.completions == want.completions[::-1]
