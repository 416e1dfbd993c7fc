"""The streaming safetensors writer against the `safetensors` library: every dtype a model or checkpoint holds,
scalars, empty and non-contiguous tensors, deferred tensors and metadata read back equal with `safetensors`' own
reader; a trainer's LoRA export (merged weights computed while writing) equals merging by hand."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llm_trainer.safetensors_writer import DeferredTensor, materialize, write_safetensors


def _tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    return {
        "f32": base, "bf16": base.to(torch.bfloat16), "f16": base.to(torch.float16), "f64": base.double(),
        "i64": torch.arange(7), "i32": torch.arange(5, dtype=torch.int32), "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "u8": torch.arange(9, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "transposed": base.t(),
        "view_of_row": base[2], "f8": base.to(torch.float8_e4m3fn),
    }


def test_round_trip_equals_the_library(tmp_path):
    tensors = _tensors()
    write_safetensors(tmp_path / "ours.safetensors", tensors, metadata={"format": "pt", "step": 3})
    back = load_file(tmp_path / "ours.safetensors")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert torch.equal(back[k].reshape(-1).view(torch.uint8), v.contiguous().reshape(-1).view(torch.uint8)), k
    with safe_open(tmp_path / "ours.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "step": "3"}
    # the same tensors through the library's writer read back identically
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, tmp_path / "lib.safetensors")
    lib = load_file(tmp_path / "lib.safetensors")
    raw = lambda t: t.reshape(-1).view(torch.uint8)  # noqa: E731 - the bytes, whatever the dtype
    assert all(torch.equal(raw(lib[k]), raw(back[k])) for k in tensors)


def test_deferred_tensors_are_computed_once_each_while_writing(tmp_path):
    calls = []

    def make(i):
        def compute():
            calls.append(i)
            return torch.full((3, 2), float(i))
        return compute

    tensors = {f"w{i}": DeferredTensor((3, 2), torch.float32, make(i)) for i in range(4)}
    tensors["plain"] = torch.ones(2)
    write_safetensors(tmp_path / "d.safetensors", tensors)
    assert sorted(calls) == [0, 1, 2, 3]
    back = load_file(tmp_path / "d.safetensors")
    assert all(torch.equal(back[f"w{i}"], torch.full((3, 2), float(i))) for i in range(4))
    assert torch.equal(materialize(tensors)["w2"], torch.full((3, 2), 2.0))
    bad = {"w": DeferredTensor((2,), torch.float32, lambda: torch.zeros(3))}
    with pytest.raises(RuntimeError, match="announced"):
        write_safetensors(tmp_path / "bad.safetensors", bad)


def test_unsupported_dtype_is_named(tmp_path):
    with pytest.raises(TypeError, match="'c'.*complex64"):
        write_safetensors(tmp_path / "c.safetensors", {"c": torch.zeros(2, dtype=torch.complex64)})


def test_lora_export_equals_merging_by_hand(tmp_path):
    from llm_trainer.model import LlmModel, ModelConfig
    from llm_trainer.model.lora import LoRALinear, apply_lora
    from llm_trainer.trainers.setup import merge_lora_state, write_model_folder

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    model = apply_lora(LlmModel(cfg), r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_()
    state = merge_lora_state(model.state_dict(), model)
    assert sum(isinstance(v, DeferredTensor) for v in state.values()) == 6
    write_model_folder(state, cfg, tmp_path / "out")
    loaded = LlmModel.from_pretrained(tmp_path / "out")
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            want = m.weight + m.scaling * (m.lora_B.weight @ m.lora_A.weight)
            torch.testing.assert_close(loaded.get_submodule(name).weight, want, rtol=0, atol=1e-6)
    ids = torch.randint(0, 64, (2, 9))
    model.eval()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
