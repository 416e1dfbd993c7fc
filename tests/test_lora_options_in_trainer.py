"""LoRA options reached through the trainer: a quantized base (QLoRA, int8: plain torch) trains and exports a
full-precision folder, and ``trainable_token_rows_from`` trains only the new vocabulary rows next to the adapters
(the old rows stay bit-identical and the masked head is never weight-decayed)."""
from __future__ import annotations

import torch

from llm_trainer.configs import LoRAConfig, OptimConfig
from llm_trainer.model import LlmModel
from llm_trainer.trainers.sft import SFTTrainer

from trainer_utils import tiny_model_config, train_config, write_sft


def test_qlora_int8_base_trains_and_exports_full_precision(tmp_path):
    data = write_sft(tmp_path / "sft", n=16)
    cfg = train_config(tmp_path, data, max_steps=3, lora=LoRAConfig(r=4, alpha=8.0, quantize_base="int8"))
    tr = SFTTrainer(train_config=cfg)
    losses = [tr.train_step(w)["loss"] for w in tr.training_windows()]
    assert all(torch.isfinite(torch.tensor(losses)))
    path = tr.export()
    reloaded = LlmModel.from_pretrained(path)
    assert all(p.dtype == torch.float32 for p in reloaded.parameters())
    ids = torch.randint(1, 90, (1, 8))
    with torch.no_grad():
        mine = tr.backend.unwrap(tr.model).eval()(input_ids=ids).logits
        theirs = reloaded(input_ids=ids).logits
    torch.testing.assert_close(theirs, mine, atol=1e-4, rtol=1e-4)   # int8 base dequantised, adapters merged


def test_only_the_new_token_rows_train_next_to_the_adapters(tmp_path):
    data = write_sft(tmp_path / "sft", n=16)
    first_new = 80
    cfg = train_config(tmp_path, data, max_steps=3, model_config=tiny_model_config(tie_word_embeddings=False),
                       optim_config=OptimConfig(initial_lr=1e-2, weight_decay=0.1),
                       lora=LoRAConfig(r=4, alpha=8.0, trainable_token_rows_from=first_new))
    tr = SFTTrainer(train_config=cfg)
    model = tr.backend.unwrap(tr.model)
    before = {n: model.model.embed_tokens.weight.detach().clone() if n == "embed" else model.lm_head.weight.detach().clone()
              for n in ("embed", "head")}
    decayed = {id(p) for g in tr.optimizer.param_groups if g.get("weight_decay", 0) > 0 for p in g["params"]}
    assert id(model.lm_head.weight) not in decayed and id(model.model.embed_tokens.weight) not in decayed
    for w in tr.training_windows():
        tr.train_step(w)
    for name, now in (("embed", model.model.embed_tokens.weight), ("head", model.lm_head.weight)):
        assert torch.equal(now[:first_new], before[name][:first_new]), name       # old rows untouched
        assert not torch.equal(now[first_new:], before[name][first_new:]), name   # new rows learned
