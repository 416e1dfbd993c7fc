"""Packed batches attend per document (`DocumentLayout`, no S×S mask): logits and gradients equal to the dense-mask
path in fp32 (logits atol 1e-5; gradients atol 1e-5, rtol 1e-4), layout bookkeeping, fallbacks and selection."""
import pytest
import torch

from llm_trainer.model import LlmModel, ModelConfig, MoEConfig
from llm_trainer.model.layers import DocumentLayout, _bucket_lengths
from llm_trainer.model.llm import prepare_attention

V = 97


def tiny(**kw):
    torch.manual_seed(0)
    base = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                initializer_range=0.1)
    return LlmModel(ModelConfig(**{**base, **kw}))


def packed_batch():
    """Two rows of 48 tokens: documents of 1..29 tokens (several length buckets), trailing padding in row 0."""
    lengths = [[1, 5, 17, 3, 9, 8], [29, 2, 1, 16]]
    doc = torch.full((2, 48), -1, dtype=torch.long)
    for r, row in enumerate(lengths):
        start = 0
        for d, n in enumerate(row):
            doc[r, start:start + n] = d
            start += n
    torch.manual_seed(1)
    ids = torch.randint(0, V, (2, 48))
    return ids, doc, (doc >= 0).long()


def run(model, impl, ids, doc, mask=None):
    model.zero_grad()
    model.set_packed_attention(impl)
    out = model(ids, attention_mask=mask, document_ids=doc)
    (out.logits.logsumexp(-1).mean() + out.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("kw", [
    dict(),
    dict(num_key_value_heads=4, attention_bias=True),
    dict(use_qk_norm=True, head_dim=16),
    dict(moe=MoEConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)),
])
@pytest.mark.parametrize("with_mask", [False, True])
def test_per_document_equals_dense_mask(kw, with_mask):
    model = tiny(**kw).train()
    ids, doc, mask = packed_batch()
    mask = mask if with_mask else None
    dense_logits, dense_grads = run(model, "dense_mask", ids, doc, mask)
    logits, grads = run(model, "per_document", ids, doc, mask)
    torch.testing.assert_close(logits, dense_logits, atol=1e-5, rtol=0)
    assert grads.keys() == dense_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], dense_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_default_is_per_document_and_builds_no_square_mask():
    model = tiny()
    assert model.packed_attention == "per_document"
    ids, doc, mask = packed_batch()
    pos, attn_mask, is_causal, key_mask, layout = prepare_attention(2, 48, 0, mask, None, doc, "cpu")
    assert attn_mask is None and not is_causal and isinstance(layout, DocumentLayout)
    _, attn_mask, _, _, layout = prepare_attention(2, 48, 0, mask, None, doc, "cpu", per_document=False)
    assert layout is None and attn_mask.shape == (2, 1, 48, 48)
    with pytest.raises(ValueError, match="packed attention must be one of"):
        model.set_packed_attention("flash")


def test_layout_covers_every_token_once_with_bounded_padding():
    _, doc, _ = packed_batch()
    layout = DocumentLayout.from_document_ids(doc)
    flat = doc.reshape(-1)
    rows = torch.cat([g.reshape(-1) for g in layout.gather])
    # every token's output row is one of the slots that read that very token
    assert torch.equal(rows[layout.scatter], torch.arange(flat.numel()))
    for g in layout.gather:  # each bucket row reads one document (or one padding token), left to right
        assert torch.all(g[:, 1:] >= g[:, :-1])
        assert all(len(set(flat[r].tolist())) == 1 for r in g)
    lengths = torch.tensor([1, 2, 3, 4, 5, 8, 9, 17, 29, 100, 1000, 20000])
    buckets = _bucket_lengths(lengths)
    assert torch.all(buckets >= lengths) and torch.all(buckets <= (lengths.double() * 1.25).ceil().long())
    assert buckets.tolist()[-3:] == [112, 1024, 20480]


def test_non_contiguous_documents_fall_back_to_dense_mask():
    model = tiny().eval()
    ids = torch.randint(0, V, (1, 9))
    doc = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 2, 2]])  # document 0 resumes after document 1
    assert DocumentLayout.from_document_ids(doc) is None
    with torch.no_grad():
        per_doc = model(ids, document_ids=doc).logits
        model.set_packed_attention("dense_mask")
        dense = model(ids, document_ids=doc).logits
    assert torch.equal(per_doc, dense)


def test_packed_with_gradient_checkpointing_same_grads():
    model = tiny(hidden_dropout=0.1, attention_dropout=0.1).train()
    ids, doc, _ = packed_batch()
    torch.manual_seed(3)
    plain_logits, plain = run(model, "per_document", ids, doc)
    model.set_gradient_checkpointing(True)
    torch.manual_seed(3)
    ckpt_logits, ckpt = run(model, "per_document", ids, doc)
    assert torch.equal(plain_logits, ckpt_logits)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
