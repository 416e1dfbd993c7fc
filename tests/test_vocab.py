"""Vocabulary extension: added tokens and a merged BPE vocabulary, embedding/head resize and row init, training only
the new rows next to LoRA, and the extended folder in `transformers` (same ids, same logits, fp32)."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from llm_trainer.model import LlmModel, ModelConfig
from llm_trainer.model.lora import apply_lora, lora_parameters
from llm_trainer.model.vocab import extend_vocabulary, merge_bpe_vocab, resize_token_embeddings, train_new_token_rows
from llm_trainer.optim import build_param_groups
from llm_trainer.tokenizer import Tokenizer, train_tokenizer

LATIN = ["ta", "ke", "ri", "mo", "la", "sen", "dor", "pu", "vi", "na"]
GREEK = ["κα", "λη", "με", "ρα", "το", "σπι", "θα", "ξε", "νύ", "χτα"]
ENGLISH_TEXT = "kemo taladorpu rimo senvi nala"
GREEK_TEXT = "καλημέρα σπίτι θαλασσα"


def _corpus(path, syllables, seed, words=3000):
    rng = random.Random(seed)
    lexicon = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(60)]
    lines = [" ".join(rng.choice(lexicon) for _ in range(12)) for _ in range(words // 12)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lexicon


@pytest.fixture(scope="module")
def tokenizers_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    _corpus(d / "en.txt", LATIN, 0)
    lexicon = _corpus(d / "el.txt", GREEK, 1)
    base = train_tokenizer([d / "en.txt"], 300, d / "base", show_progress=False)
    other = train_tokenizer([d / "el.txt"], 420, d / "other", show_progress=False)
    return Tokenizer(d / "base"), Tokenizer(d / "other"), lexicon


def _model(vocab, tie, seed=0):
    torch.manual_seed(seed)
    return LlmModel(ModelConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
                                attention_bias=True, architecture="qwen2"))


def test_merged_bpe_tokenises_the_new_language_into_new_tokens(tokenizers_pair):
    base, other, lexicon = tokenizers_pair
    merged, added = merge_bpe_vocab(base.backend, other.backend)
    n_old = base.vocab_size
    assert added and merged.get_vocab_size(with_added_tokens=True) == n_old + len(added)
    assert sorted(merged.token_to_id(t) for t in added) == list(range(n_old, n_old + len(added)))
    text = " ".join(lexicon[:20])
    before, after = base.encode(text), merged.encode(text).ids
    assert len(after) < len(before) / 5                      # whole Greek words now, instead of bytes
    assert all(i >= n_old for i in after)
    assert merged.encode(text).tokens == other.backend.encode(text).tokens   # split exactly as the other does
    assert merged.decode(after) == text
    assert merged.encode(ENGLISH_TEXT).ids == base.encode(ENGLISH_TEXT)   # our merges keep priority
    # special tokens keep their ids
    for tok in base.special_tokens:
        assert merged.token_to_id(tok) == base.token_to_id(tok)


@pytest.mark.parametrize("tie", [True, False])
def test_extend_with_other_tokenizer_exports_to_transformers(tokenizers_pair, tmp_path, tie):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, other, lexicon = tokenizers_pair
    model = _model(base.vocab_size, tie).eval()
    ids_en = torch.tensor([base.encode(ENGLISH_TEXT)])
    with torch.no_grad():
        before = model(ids_en).logits
    model, tok = extend_vocabulary(model, base, other, init="subtokens", pad_to_multiple_of=64)
    assert base.vocab_size == 300 and tok.vocab_size > 300        # the given tokenizer is unchanged
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= tok.vocab_size
    assert model.get_input_embeddings().weight.shape[0] == model.config.vocab_size
    if not tie:
        assert model.lm_head.weight.shape[0] == model.config.vocab_size == model.lm_head.out_features
    with torch.no_grad():
        after = model(ids_en).logits
    torch.testing.assert_close(after[..., :base.vocab_size], before, atol=0, rtol=0)   # old rows untouched
    # "subtokens": a new token's row is the mean of the rows of its old-tokenizer pieces
    word = max(lexicon, key=len)
    new_id = tok.token_to_id(tok.backend.encode(" " + word).tokens[-1])
    assert new_id is not None and new_id >= base.vocab_size
    pieces = base.encode(tok.decode([new_id]))
    emb = model.get_input_embeddings().weight
    torch.testing.assert_close(emb[new_id], emb[pieces].mean(0))

    model.save_pretrained(tmp_path)
    tok.save(tmp_path)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.config.vocab_size == model.config.vocab_size and hf.config.tie_word_embeddings == tie
    text = GREEK_TEXT + " " + " ".join(lexicon[:8]) + " " + ENGLISH_TEXT
    ids = tok.encode(text)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    assert max(ids) >= base.vocab_size
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)
    reloaded = LlmModel.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, atol=0, rtol=0)


def test_added_tokens_and_row_inits(tokenizers_pair):
    base, _, _ = tokenizers_pair
    v = base.vocab_size
    model = _model(v + 4, tie=False)                      # a padded model: rows v..v+3 exist but are unused
    old_emb = model.get_input_embeddings().weight.detach().clone()
    model, tok = extend_vocabulary(model, base, ["<lang_el>", "καλημέρα", "<lang_el>", "ta"], special=False)
    new_ids = [tok.token_to_id("<lang_el>"), tok.token_to_id("καλημέρα")]
    assert new_ids == [v, v + 1] and tok.vocab_size == v + 2
    assert model.config.vocab_size == v + 4                 # the padding rows were enough: no resize
    assert tok.encode("<lang_el> καλημέρα") == [v] + base.encode(" ") + [v + 1]
    assert tok.encode("<lang_el>καλημέρα") == [v, v + 1]
    assert tok.decode(tok.encode("<lang_el>καλημέρα")) == "<lang_el>καλημέρα"
    emb, head = model.get_input_embeddings().weight, model.lm_head.weight
    for w in (emb, head):                                    # "mean": the mean of the rows of the old tokens only
        ref = w[:v].mean(0)
        torch.testing.assert_close(w[v], ref)
        torch.testing.assert_close(w[v + 1], ref)
    torch.testing.assert_close(emb[v + 2:], old_emb[v + 2:])  # unused padding rows left as they were

    m2 = _model(v, tie=True)
    seen = []

    def init(weight, ids):
        seen.append(list(ids))
        return torch.full((len(ids), weight.shape[1]), 0.5)

    m2, _ = extend_vocabulary(m2, base, ["xyz", "uvw"], init=init, pad_to_multiple_of=8)
    assert seen == [[v, v + 1]]                              # tied: called once
    w = m2.get_input_embeddings().weight
    assert torch.all(w[v:v + 2] == 0.5) and w.shape[0] == -(-(v + 2) // 8) * 8
    torch.testing.assert_close(w[v + 2:], w[:v].mean(0).expand(w.shape[0] - v - 2, -1))   # padding rows: mean

    m3 = _model(v, tie=True)
    torch.manual_seed(3)
    m3, _ = extend_vocabulary(m3, base, [f"tok{i}" for i in range(400)], init="normal")
    rows = m3.get_input_embeddings().weight[v:]
    assert abs(rows.std().item() - m3.config.initializer_range) < 0.003 and abs(rows.mean().item()) < 0.003


@pytest.mark.parametrize("tie", [True, False])
def test_train_only_new_rows_with_lora(tokenizers_pair, tie):
    base, other, _ = tokenizers_pair
    model, tok = extend_vocabulary(_model(base.vocab_size, tie), base, other)
    first = base.vocab_size
    apply_lora(model, r=4, alpha=8)
    train_new_token_rows(model, first)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.weight" in names and ("lm_head.weight" in names) != tie
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = build_param_groups(model, weight_decay=0.0 if not tie else 0.1)
    opt = torch.optim.AdamW(groups, lr=1e-2)
    ids = torch.tensor([tok.encode(GREEK_TEXT + " " + ENGLISH_TEXT)])
    assert (ids >= first).any() and (ids < first).any()
    model.train()
    losses = []
    for _ in range(5):
        logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name in ["model.embed_tokens.weight"] + ([] if tie else ["lm_head.weight"]):
        p = dict(model.named_parameters())[name]
        assert torch.equal(p[:first], old[name][:first]), name          # old rows bit-identical
        assert not torch.equal(p[first:], old[name][first:]), name      # new rows learned
    assert all(not torch.equal(p, old[n]) for n, p in model.named_parameters() if ".lora_B." in n)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(torch.equal(dict(model.named_parameters())[n], old[n]) for n in frozen)
    assert len(lora_parameters(model)) > 0


def test_errors(tokenizers_pair):
    base, other, _ = tokenizers_pair
    with pytest.raises(ValueError, match="do not belong together"):
        extend_vocabulary(_model(100, True), base, ["abc"])
    with pytest.raises(ValueError, match="init must be one of"):
        extend_vocabulary(_model(base.vocab_size, True), base, ["abc"], init="zeros")
    with pytest.raises(TypeError, match="list of non-empty strings"):
        extend_vocabulary(_model(base.vocab_size, True), base, "abc")
    with pytest.raises(ValueError, match="cannot shrink"):
        resize_token_embeddings(_model(base.vocab_size, True), 10)
    from tokenizers import Tokenizer as HFTokenizer, models
    word_level = HFTokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    with pytest.raises(ValueError, match="other tokenizer's model is 'WordLevel'"):
        merge_bpe_vocab(base.backend, word_level)
    model = apply_lora(_model(base.vocab_size, False), r=2, alpha=2, target_modules=["lm_head"])
    with pytest.raises(ValueError, match="lm_head is a LoRALinear"):
        extend_vocabulary(model, base, ["abc"])
    with pytest.raises(ValueError, match="first_new_id"):
        train_new_token_rows(_model(base.vocab_size, True), base.vocab_size)
