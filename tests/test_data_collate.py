"""Collates: right/left padding, DPO 2B batches, packing — and packing equivalence with LlmModel."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_trainer.data import (DPOCollate, PackingCollate, PadCollate, PromptCollate, collate_for, pack_sequences,
                              pad_with_mask,
                              pad_sequences)

PAD = 0
T = torch.tensor


def test_pad_collate_right_pads_with_ignore_labels():
    batch = [{"input_ids": T([5, 6, 7]), "labels": T([-100, 6, 7])}, {"input_ids": T([8])}]
    out = PadCollate(PAD)(batch)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]     # no labels given: input_ids (unshifted)
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(v.dtype == torch.long for v in out.values())
    assert PadCollate(PAD, pad_to_multiple_of=4)(batch)["input_ids"].shape == (2, 4)


def test_pad_collate_splits_pretraining_windows_at_eos():
    EOS = 2
    out = PadCollate(PAD, eos_token_id=EOS)([{"input_ids": T([5, 6, EOS, 7, EOS, 8])}, {"input_ids": T([9, EOS])}])
    assert out["document_ids"].tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, -1, -1, -1, -1]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 0, 0, 0, 0]]
    # the first token of a later document is never predicted from the previous one
    assert out["labels"].tolist() == [[5, 6, EOS, -100, EOS, -100], [9, EOS, -100, -100, -100, -100]]


def test_prompt_collate_keeps_lists_and_missing_answers():
    batch = [{"prompt_ids": T([5, 6, 7]), "answer_ids": T([1]), "answer_text": "1"},
             {"prompt_ids": T([8]), "images": ["x.png"]}]
    out = PromptCollate()(batch)
    assert out["prompt_ids"] == [[5, 6, 7], [8]]
    assert out["answer_ids"] == [[1], None] and out["answer_text"] == ["1", None]
    assert out["images"] == [[], ["x.png"]]
    assert pad_sequences([T([1]), T([2, 3])], 9, side="left").tolist() == [[9, 1], [2, 3]]
    ids, mask = pad_with_mask([T([1]), T([2, 3])], 9, side="left")
    assert ids.tolist() == [[9, 1], [2, 3]] and mask.tolist() == [[0, 1], [1, 1]]


def test_dpo_collate_concatenates_chosen_then_rejected():
    batch = [{"chosen_input_ids": T([1, 2, 3]), "chosen_labels": T([-100, 2, 3]),
              "rejected_input_ids": T([1, 4]), "rejected_labels": T([-100, 4])},
             {"chosen_input_ids": T([5]), "chosen_labels": T([5]),
              "rejected_input_ids": T([5, 6, 7, 8]), "rejected_labels": T([-100, 6, 7, 8])}]
    out = DPOCollate(PAD)(batch)
    assert out["input_ids"].tolist() == [[1, 2, 3, 0], [5, 0, 0, 0], [1, 4, 0, 0], [5, 6, 7, 8]]
    assert out["labels"].tolist() == [[-100, 2, 3, -100], [5, -100, -100, -100], [-100, 4, -100, -100],
                                      [-100, 6, 7, 8]]
    assert out["attention_mask"].sum(1).tolist() == [3, 1, 2, 4]


def test_pack_sequences_first_fit_decreasing():
    lengths = [5, 3, 8, 2, 7, 1]
    rows = pack_sequences(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == 3                                   # 26 tokens, 10 per row
    with pytest.raises(ValueError, match="more than the row capacity"):
        pack_sequences([11], 10)


def test_packing_collate_layout():
    batch = [{"input_ids": T([1, 2, 3]), "labels": T([-100, 2, 3])}, {"input_ids": T([4, 5, 6, 7, 8])},
             {"input_ids": T([9, 10])}, {"input_ids": T(list(range(11, 21)))}]
    c = PackingCollate(8, PAD)
    out = c(batch)
    assert out["input_ids"].shape == (3, 8) and c.num_truncated == 1   # the 10-token item was cut to 8
    row = out["input_ids"].tolist()
    assert row[1] == [1, 2, 3, 4, 5, 6, 7, 8]                           # 3 + 5 share a row
    assert out["document_ids"][1].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert out["position_ids"][1].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    assert out["labels"][1].tolist() == [-100, 2, 3, -100, 5, 6, 7, 8]
    assert out["document_ids"][2].tolist() == [0, 0, -1, -1, -1, -1, -1, -1]
    assert out["attention_mask"][2].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert collate_for("sft", PAD, packing=True, block_size=8)(batch)["input_ids"].shape == (3, 8)


def _tiny_model(vocab=64):
    from llm_trainer.model import LlmModel, ModelConfig
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlmModel(cfg).eval()


def _ce_sum(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def test_packing_equivalence_with_llm_model():
    """Logits of a packed batch equal each sample run alone; so does the summed loss (labels never cross)."""
    model = _tiny_model()
    g = torch.Generator().manual_seed(1)
    samples = []
    for n in (5, 9, 3, 12, 7, 4, 6):
        ids = torch.randint(1, 64, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 3] = -100                                          # a prompt part
        samples.append({"input_ids": ids, "labels": labels})
    packed = PackingCollate(16, PAD)(samples)
    assert packed["input_ids"].shape[0] < len(samples)                  # rows really hold several documents
    with torch.no_grad():
        out = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                    position_ids=packed["position_ids"], document_ids=packed["document_ids"]).logits
        seen = 0
        loss_alone = torch.zeros(())
        for r in range(packed["input_ids"].shape[0]):
            docs = packed["document_ids"][r]
            for d in docs[docs >= 0].unique().tolist():
                cols = (docs == d).nonzero().squeeze(1)
                ids = packed["input_ids"][r, cols]
                k = next(i for i, s in enumerate(samples) if torch.equal(s["input_ids"], ids))
                alone = model(input_ids=ids[None]).logits[0]
                torch.testing.assert_close(out[r, cols], alone, atol=1e-5, rtol=1e-5)
                loss_alone += _ce_sum(alone[None], samples[k]["labels"][None])
                seen += 1
        assert seen == len(samples)
        torch.testing.assert_close(_ce_sum(out, packed["labels"]), loss_alone, atol=1e-4, rtol=1e-5)
        # positions restart per document: leaving document_ids out would let documents see each other
        leak = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                     position_ids=packed["position_ids"]).logits
        assert not torch.allclose(leak, out, atol=1e-3)


def test_pretraining_windows_with_eos_masking_equal_documents_alone():
    EOS = 2
    model = _tiny_model()
    docs = [T([5, 6, 7, EOS]), T([8, 9, EOS]), T([10, 11, 12, 13])]
    window = torch.cat(docs)
    out = PadCollate(PAD, eos_token_id=EOS)([{"input_ids": window}])
    with torch.no_grad():
        logits = model(input_ids=out["input_ids"], attention_mask=out["attention_mask"],
                       position_ids=out["position_ids"], document_ids=out["document_ids"]).logits[0]
        start = 0
        for d in docs:
            torch.testing.assert_close(logits[start:start + len(d)], model(input_ids=d[None]).logits[0],
                                       atol=1e-5, rtol=1e-5)
            start += len(d)
