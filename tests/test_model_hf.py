"""Logit parity with transformers and HF-folder IO (tiny random models, fp32, CPU, offline)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm_trainer.model import LlmModel, ModelConfig, load_hf_state_dict

transformers = pytest.importorskip("transformers")

V = 128
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),  # heads*head_dim != hidden
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48, "norm_topk_prob": False}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True,
        "head_dim": 16}),
}


def make_hf(family, tied=False, rope_scaling=None, max_pos=64):
    cfg_name, cls_name, extra = FAMILIES[family]
    kwargs = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=max_pos, tie_word_embeddings=tied, **extra)
    if rope_scaling:
        kwargs["rope_scaling"] = dict(rope_scaling)
    config = getattr(transformers, cfg_name)(**kwargs)
    model = getattr(transformers, cls_name)(config).float().eval()
    with torch.no_grad():  # larger-than-default weights so that differences would show
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


def padded_batch(side):
    ids = torch.randint(0, V, (3, 10))
    lengths = [10, 7, 4]
    mask = torch.zeros(3, 10, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, 10 - n:] = 1
        else:
            mask[i, :n] = 1
    return ids, mask


@torch.no_grad()
def hf_logits(model, ids, mask):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def max_diff_real(a, b, mask):
    return (a - b).abs()[mask.bool()].max().item()


def assert_parity(hf, ours, tol=1e-4):
    for side in ("left", "right"):
        ids, mask = padded_batch(side)
        with torch.no_grad():
            got = ours(ids, attention_mask=mask).logits
        assert max_diff_real(got, hf_logits(hf, ids, mask), mask) <= tol, side


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [False, True])
def test_dense_parity_and_round_trip(tmp_path, family, tied):
    hf = make_hf(family, tied)
    hf.save_pretrained(tmp_path / "hf")
    ours = LlmModel.from_pretrained(tmp_path / "hf")
    assert ours.config.architecture == family and ours.config.tie_word_embeddings == tied
    assert ("lm_head.weight" in ours.state_dict()) == (not tied)
    assert_parity(hf, ours)

    # save with ours (sharded for the untied case), reload with transformers
    ours.save_pretrained(tmp_path / "ours", max_shard_size="20KB" if not tied else "5GB")
    files = sorted(p.name for p in (tmp_path / "ours").iterdir())
    if tied:
        assert "model.safetensors" in files
        assert "lm_head.weight" not in load_file(tmp_path / "ours" / "model.safetensors")
    else:
        assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 1
    back = getattr(transformers, FAMILIES[family][1]).from_pretrained(tmp_path / "ours", dtype=torch.float32)
    ids, mask = padded_batch("left")
    diff = max_diff_real(hf_logits(back.eval(), ids, mask), hf_logits(hf, ids, mask), mask)
    assert diff <= 1e-6


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 4},
])
def test_rope_scaling_parity(tmp_path, scaling):
    hf = make_hf("llama", rope_scaling=scaling, max_pos=8)  # sequences of 10 > 8 exercise dynamic NTK
    hf.save_pretrained(tmp_path)
    ours = LlmModel.from_pretrained(tmp_path)
    assert ours.config.rope_scaling.rope_type == scaling["rope_type"]
    assert_parity(hf, ours)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_moe_parity(tmp_path, family):
    hf = make_hf(family)
    hf.save_pretrained(tmp_path / "hf")
    ours = LlmModel.from_pretrained(tmp_path / "hf")
    assert ours.config.moe is not None and ours.config.moe.num_experts == 4
    assert_parity(hf, ours)
    ours.save_pretrained(tmp_path / "ours")
    back = getattr(transformers, FAMILIES[family][1]).from_pretrained(tmp_path / "ours", dtype=torch.float32)
    ids, mask = padded_batch("right")
    assert max_diff_real(hf_logits(back.eval(), ids, mask), hf_logits(hf, ids, mask), mask) <= 1e-6


def tiny(**kw):
    base = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return LlmModel(ModelConfig(**{**base, **kw}))


def test_own_moe_format_and_sharding_round_trip(tmp_path):
    model = tiny(moe={"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                      "n_shared_experts": 1, "first_k_dense": 1}, use_qk_norm=True)
    model.save_pretrained(tmp_path / "m", max_shard_size=10_000)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "llm_trainer"
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = LlmModel.from_pretrained(tmp_path / "m")
    assert back.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    # re-saving unsharded into the same folder removes the stale shards and index
    back.save_pretrained(tmp_path / "m")
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == ["config.json", "model.safetensors"]
    # loading into an existing model, tensor by tensor
    fresh = tiny(moe=model.config.moe, use_qk_norm=True)
    load_hf_state_dict(fresh, tmp_path / "m")
    ids = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids).logits, model.eval()(ids).logits)


def test_checkpoint_errors(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    sd = load_file(weights)

    key = "model.layers.1.mlp.up_proj.weight"
    save_file({k: v for k, v in sd.items() if k != key}, weights)
    with pytest.raises(KeyError, match=f"missing tensor '{key}'"):
        LlmModel.from_pretrained(tmp_path)

    save_file({**sd, "model.extra.weight": torch.zeros(2)}, weights)
    with pytest.raises(KeyError, match="unexpected tensor 'model.extra.weight' in .*model.safetensors"):
        LlmModel.from_pretrained(tmp_path)

    save_file({**sd, key: torch.zeros(3, 3)}, weights)
    with pytest.raises(ValueError, match=rf"shape mismatch for '{key}' in .*model.safetensors"):
        LlmModel.from_pretrained(tmp_path)

    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture: model_type='gpt2'"):
        LlmModel.from_pretrained(tmp_path)
