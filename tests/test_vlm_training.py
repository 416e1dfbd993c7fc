"""VLM training end to end on tiny synthetic images: SFT/DPO/GRPO steps, freezing, build/load/LoRA/export,
generation with images (KV cache vs recompute, the image token never generated), eval generations with images."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_trainer.configs import DPOConfig, GRPOConfig, LoRAConfig, OptimConfig, SFTConfig, TrainConfig
from llm_trainer.data.formats import IndexedWriter
from llm_trainer.generation import GenerateConfig, generate, streaming_generate
from llm_trainer.model.vision import VisionConfig
from llm_trainer.model.vlm import VLMConfig, VlmModel, expand_image_tokens

VOCAB = 96
IMG = 95
TPI = 4
COLOURS = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (240, 240, 0)]


def vlm_config(**overrides) -> VLMConfig:
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
              vision_config=VisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, image_size=16, patch_size=4),
              image_token_id=IMG, tokens_per_image=TPI)
    kw.update(overrides)
    return VLMConfig(**kw)


def write_images(folder: Path, n: int = 4) -> list[str]:
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = Image.new("RGB", (16, 16), (0, 0, 0))
        img.paste(COLOURS[i % len(COLOURS)], (2 + i, 2, 10 + i, 12))
        p = folder / f"img{i}.png"
        img.save(p)
        paths.append(str(p))
    return paths


def write_sft(path: Path, images: list[str], n: int = 8) -> Path:
    """Records ``[1, <image>, (<image>,) 5..] -> answer``: some with two images; prompt tokens untrained."""
    rng = np.random.default_rng(0)
    with IndexedWriter(path, stage="sft", vocab_size=VOCAB, has_images=True, meta={"image_token_id": IMG}) as w:
        for i in range(n):
            k = 1 + i % 2
            prompt = [1] + [IMG] * k + rng.integers(2, 90, 3).tolist()
            answer = [10 + i % 4, 2]
            mask = [0] * len(prompt) + [1] * len(answer)
            w.add_sft(prompt + answer, mask, images=[images[(i + j) % len(images)] for j in range(k)])
    return path


def train_config(tmp: Path, data: Path, **overrides) -> TrainConfig:
    kw = dict(model_config=vlm_config(), file_dataset=[str(data)], dataset_block_size=32, batch_size=4,
              output_dir=str(tmp / "out"), ds_config=None, dtype="fp32", optim_config=OptimConfig(initial_lr=1e-2),
              log_interval=1, save_interval=None, eval_interval=None, seed=3, max_steps=1)
    kw.update(overrides)
    return TrainConfig(**kw)


def pixels(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ exports
def test_public_names_resolve():
    import llm_trainer
    import llm_trainer.model as model_pkg
    for name in llm_trainer.__all__:
        assert getattr(llm_trainer, name) is not None, name
    assert llm_trainer.VLMConfig is VLMConfig and llm_trainer.VlmModel is VlmModel
    assert model_pkg.VLMConfig is VLMConfig and model_pkg.VisionConfig is VisionConfig
    assert {"VLMConfig", "VlmModel", "VisionConfig"} <= set(model_pkg.__all__)


# ------------------------------------------------------------------------------------------------ SFT
def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_sft_collate_expands_images_and_never_labels_them(tmp_path):
    from llm_trainer.trainers.sft import SFTTrainer
    images = write_images(tmp_path / "img")
    data = write_sft(tmp_path / "sft", images)
    trainer = SFTTrainer(train_config=train_config(tmp_path, data))
    items = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.collate(items)
    ids, labels = batch["input_ids"], batch["labels"]
    per_row = [len(it["images"]) for it in items]
    assert per_row == [1, 2, 1, 2]
    assert (ids == IMG).sum(1).tolist() == [n * TPI for n in per_row]
    assert not bool((labels == IMG).any()) and bool(((labels != -100) & (ids == IMG)).sum() == 0)
    assert batch["pixel_values"].shape == (sum(per_row), 3, 16, 16)
    assert batch["image_counts"].tolist() == per_row
    assert "images" not in batch
    # prompt masking still holds: only the two answer tokens of each row are trained
    assert (labels != -100).sum(1).tolist() == [2, 2, 2, 2]
    # the first image's pixels are what the default provider makes of the file
    from llm_trainer.images import DefaultPixelValuesProvider
    ref = DefaultPixelValuesProvider(16)([items[0]["images"][0]])
    assert torch.equal(batch["pixel_values"][:1], ref)


def test_sft_rows_fit_the_block_after_image_expansion(tmp_path):
    from llm_trainer.trainers.sft import SFTTrainer
    images = write_images(tmp_path / "img")
    data = write_sft(tmp_path / "sft", images)
    # stored rows hold 6-7 tokens; with 2 images of 4 tokens a row grows to 12: a block of 11 cuts only text
    trainer = SFTTrainer(train_config=train_config(tmp_path, data, dataset_block_size=11))
    items = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.collate(items)
    assert batch["input_ids"].shape[1] <= 11
    assert (batch["input_ids"] == IMG).sum(1).tolist() == [TPI, 2 * TPI, TPI, 2 * TPI]
    # a block too small for the images themselves is a clear error, not a silently broken image
    trainer = SFTTrainer(train_config=train_config(tmp_path / "small", data, dataset_block_size=7))
    with pytest.raises(ValueError, match="dataset_block_size=7"):
        trainer.collate([trainer.train_dataset[i] for i in range(2)])


@pytest.mark.parametrize("freeze_vision", [True, False])
def test_sft_frozen_llm_changes_only_projector_and_encoder(tmp_path, freeze_vision):
    from llm_trainer.trainers.sft import SFTTrainer
    images = write_images(tmp_path / "img")
    data = write_sft(tmp_path / "sft", images)
    cfg = train_config(tmp_path, data, sft_config=SFTConfig(freeze_llm_model=True,
                                                            freeze_vision_encoder=freeze_vision))
    trainer = SFTTrainer(train_config=cfg)
    model = trainer.backend.unwrap(trainer.model)
    before = _snapshot(model)
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert any(n.startswith("projector.") for n in changed)
    assert not any(n.startswith("llm.") for n in changed)
    if freeze_vision:
        assert all(n.startswith("projector.") for n in changed)
    else:
        assert any(n.startswith("vision_model.") for n in changed)
    # the export is a VLM folder that VlmModel.from_pretrained reloads with the trained weights
    reloaded = VlmModel.from_pretrained(tmp_path / "out" / "final")
    for n, p in reloaded.named_parameters():
        assert torch.equal(p, model.state_dict()[n]), n


def test_sft_unfrozen_step_changes_llm_and_images_matter(tmp_path):
    from llm_trainer.trainers.sft import SFTTrainer
    images = write_images(tmp_path / "img")
    data = write_sft(tmp_path / "sft", images)
    trainer = SFTTrainer(train_config=train_config(tmp_path, data))
    model = trainer.backend.unwrap(trainer.model)
    batch = trainer.collate([trainer.train_dataset[i] for i in range(2)])
    loss = trainer.compute_loss(model, batch).loss
    other = dict(batch, pixel_values=batch["pixel_values"].flip(0))
    assert not torch.allclose(loss, trainer.compute_loss(model, other).loss)
    before = _snapshot(model)
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert any(n.startswith("llm.") for n in changed) and any(n.startswith("projector.") for n in changed)


def test_sft_packing_keeps_row_image_order(tmp_path):
    from llm_trainer.trainers.sft import SFTTrainer
    images = write_images(tmp_path / "img")
    data = write_sft(tmp_path / "sft", images)
    cfg = train_config(tmp_path, data, dataset_block_size=64, sft_config=SFTConfig(packing=True))
    trainer = SFTTrainer(train_config=cfg)
    items = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.collate(items)
    counts = batch["image_counts"].tolist()
    assert sum(counts) == 6 and (batch["input_ids"] == IMG).sum(1).tolist() == [c * TPI for c in counts]
    model = trainer.backend.unwrap(trainer.model)
    assert torch.isfinite(trainer.compute_loss(model, batch).loss)


# ------------------------------------------------------------------------------------------------ build/LoRA
def test_build_lora_only_on_language_model_and_export_reload(tmp_path):
    from llm_trainer.parallel import get_backend
    from llm_trainer.trainers.setup import build_model, export_model, resolve_model_config
    cfg = TrainConfig(model_config=vlm_config(), output_dir=str(tmp_path / "o"), ds_config=None, dtype="fp32",
                      lora=LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    backend = get_backend(None, "fp32")
    torch.manual_seed(0)
    model = build_model(resolve_model_config(cfg.model_config, cfg.init_weights_path), backend, lora=cfg.lora)
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora_names and all(n.startswith("llm.") for n in lora_names)
    assert all(not p.requires_grad for n, p in model.llm.named_parameters() if "lora_" not in n)
    assert all(p.requires_grad for p in model.projector.parameters())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    ids = torch.tensor([expand_image_tokens([1, IMG, 5, 6], IMG, TPI)])
    pv = pixels(1)
    with torch.no_grad():
        expected = model(ids, pixel_values=pv).logits
    path = export_model(backend, model, tmp_path / "o" / "final")
    reloaded = VlmModel.from_pretrained(path)
    assert not any("lora_" in n for n, _ in reloaded.named_parameters())
    with torch.no_grad():
        assert torch.allclose(reloaded(ids, pixel_values=pv).logits, expected, atol=1e-5)
    # init_weights_path = the exported VLM folder: its config and weights come back
    cfg2 = TrainConfig(model_config=None, init_weights_path=str(path), output_dir=str(tmp_path / "o2"),
                       ds_config=None, dtype="fp32")
    mc = resolve_model_config(cfg2.model_config, cfg2.init_weights_path)
    assert isinstance(mc, VLMConfig) and mc == reloaded.config
    again = build_model(mc, backend, weights=cfg2.init_weights_path)
    with torch.no_grad():
        assert torch.equal(again(ids, pixel_values=pv).logits, reloaded(ids, pixel_values=pv).logits)


def test_vlm_config_with_llm_folder_initialises_the_language_model(tmp_path):
    from llm_trainer.model.hf import save_pretrained
    from llm_trainer.parallel import get_backend
    from llm_trainer.trainers.setup import build_model, resolve_model_config
    vc = vlm_config()
    torch.manual_seed(5)
    llm = VlmModel(vc).llm
    save_pretrained(llm, tmp_path / "llm")
    cfg = TrainConfig(model_config=vc, init_weights_path=str(tmp_path / "llm"), output_dir=str(tmp_path / "o"),
                      ds_config=None, dtype="fp32")
    assert resolve_model_config(cfg.model_config, cfg.init_weights_path) is vc
    model = build_model(vc, get_backend(None, "fp32"), weights=cfg.init_weights_path)
    for n, p in llm.state_dict().items():
        assert torch.equal(model.llm.state_dict()[n], p), n


# ------------------------------------------------------------------------------------------------ generation
def _image_loving_model(seed: int = 3) -> VlmModel:
    """A model whose unprocessed greedy choice would often be the image token."""
    torch.manual_seed(seed)
    model = VlmModel(vlm_config()).eval()
    with torch.no_grad():
        model.llm.lm_head.weight[IMG] = model.llm.lm_head.weight[IMG] * 4 + model.llm.lm_head.weight.mean(0) * 2
    return model


def test_generate_with_images_cache_equals_recompute_and_never_emits_image_token():
    model = _image_loving_model()
    prompts = [expand_image_tokens([1, IMG, 5, IMG, 7], IMG, TPI), expand_image_tokens([2, 3, IMG, 9], IMG, TPI)]
    pv = pixels(3, seed=7)
    steps = 8
    out = generate(model, prompts, GenerateConfig(max_new_tokens=steps, do_sample=False), eos_token_ids=[],
                   pad_token_id=0, pixel_values=pv)
    raw_picks = 0
    split = [pv[:2], pv[2:]]
    for b, prompt in enumerate(prompts):
        seq = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(steps):       # no cache: the whole sequence with its images every step
                logits = model(seq, pixel_values=split[b]).logits[:, -1]
                raw_picks += int(logits.argmax(-1) == IMG)
                logits[:, IMG] = float("-inf")
                seq = torch.cat([seq, logits.argmax(-1)[:, None]], dim=1)
        assert out.completions[b] == seq[0, len(prompt):].tolist()
        assert IMG not in out.completions[b]
    assert raw_picks > 0          # the suppression was needed
    # sampling with a group: never the image token either; streaming agrees with batch-of-one greedy
    g = generate(model, prompts, GenerateConfig(max_new_tokens=steps, temperature=2.0), eos_token_ids=[],
                 pad_token_id=0, pixel_values=pv, group_size=3, generator=torch.Generator().manual_seed(0))
    assert len(g.completions) == 6 and all(IMG not in c for c in g.completions)
    stream = list(streaming_generate(model, prompts[1], GenerateConfig(max_new_tokens=steps, do_sample=False),
                                     eos_token_ids=[], pixel_values=split[1]))
    assert stream == out.completions[1]


def test_eval_sample_generations_with_image_tags(tmp_path):
    from llm_trainer.tokenizer import train_tokenizer
    from llm_trainer.trainers.images import eval_generation_inputs
    from llm_trainer.trainers.sft import SFTTrainer
    images = write_images(tmp_path / "img")
    corpus = tmp_path / "c.txt"
    corpus.write_text("how many shapes are there? red green blue yellow one two three\n" * 20)
    tok = train_tokenizer([str(corpus)], 300, tmp_path / "tok", show_progress=False)
    tid = tok.image_token_id
    with IndexedWriter(tmp_path / "sft", stage="sft", vocab_size=300, has_images=True,
                       meta={"image_token_id": tid}) as w:
        for i in range(4):
            ids = tok.encode("how many") + [tid] + tok.encode(" two")
            w.add_sft(ids, [0] * (len(ids) - 1) + [1], images=[images[i]])
    cfg = train_config(tmp_path, tmp_path / "sft", model_config=vlm_config(vocab_size=300, image_token_id=tid),
                       tokenizer=str(tmp_path / "tok"), eval_config=GenerateConfig(max_new_tokens=3, do_sample=False))
    trainer = SFTTrainer(train_config=cfg, eval_prompts=["how many shapes?", "<image> and <image>: colours?", "hi"],
                         eval_image_tags=[images[0], [images[1], images[2]], None])
    prompts, kw = eval_generation_inputs(trainer.eval_prompts, trainer.eval_image_tags, trainer.model_config,
                                         trainer.tokenizer, trainer.format_eval_prompt, trainer.pixel_provider)
    assert [sum(1 for t in p if t == tid) for p in prompts] == [TPI, 2 * TPI, 0]
    assert kw["pixel_values"].shape == (3, 3, 16, 16)
    samples = trainer.sample_generations()
    assert len(samples) == 3 and all(isinstance(s["completion"], str) for s in samples)
    lines = (tmp_path / "out" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[1])["prompt"].startswith("<image> and")
    trainer.eval_image_tags = [images[0]]
    with pytest.raises(ValueError, match="eval_image_tags has 1 entries for 3 eval prompts"):
        trainer.sample_generations()
    trainer.eval_image_tags = [None, [images[0]], None]
    with pytest.raises(ValueError, match="eval prompt 1 has 2 image placeholder"):
        trainer.sample_generations()


# ------------------------------------------------------------------------------------------------ DPO
def test_dpo_step_repeats_pixel_values_for_chosen_and_rejected(tmp_path):
    from llm_trainer.trainers.dpo import DPOTrainer
    images = write_images(tmp_path / "img")
    with IndexedWriter(tmp_path / "dpo", stage="dpo", vocab_size=VOCAB, has_images=True,
                       meta={"image_token_id": IMG}) as w:
        for i in range(4):
            prompt = [1, IMG, 4 + i, 5]
            c, r = prompt + [10 + i, 2], prompt + [20 + i, 30, 2]
            w.add_pair(c, [0] * 4 + [1] * 2, r, [0] * 4 + [1] * 3, prompt_length=4, images=[images[i]])
    cfg = train_config(tmp_path, tmp_path / "dpo", dpo_config=DPOConfig(), batch_size=2)
    trainer = DPOTrainer(train_config=cfg)
    batch = trainer.collate([trainer.train_dataset[i] for i in range(2)])
    assert batch["input_ids"].shape[0] == 4 and batch["image_counts"].tolist() == [1, 1, 1, 1]
    assert torch.equal(batch["pixel_values"][:2], batch["pixel_values"][2:])
    assert not bool(((batch["labels"] != -100) & (batch["input_ids"] == IMG)).any())
    assert (batch["input_ids"] == IMG).sum(1).tolist() == [TPI] * 4
    model = trainer.backend.unwrap(trainer.model)
    before = _snapshot(model)
    stats = trainer.train()
    assert np.isfinite(stats["loss"])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert any(n.startswith("projector.") for n in changed) and any(n.startswith("llm.") for n in changed)


# ------------------------------------------------------------------------------------------------ GRPO
def test_grpo_step_with_image_prompts(tmp_path):
    from llm_trainer.trainers.grpo import GRPOTrainer
    images = write_images(tmp_path / "img")
    with IndexedWriter(tmp_path / "rl", stage="rl", vocab_size=VOCAB, has_images=True,
                       meta={"image_token_id": IMG}) as w:
        for i in range(4):
            k = 1 + i % 2
            w.add_rl([1] + [IMG] * k + [4 + i], images=[images[(i + j) % 4] for j in range(k)])
    seen = {}

    def reward(*, prompt_ids, completion_ids, **_):
        seen.setdefault("prompts", []).extend(prompt_ids)
        return [float(len(c) % 3) for c in completion_ids]

    gc = GenerateConfig(max_new_tokens=4, temperature=1.0)
    cfg = train_config(tmp_path, tmp_path / "rl", batch_size=2,
                       grpo_config=GRPOConfig(group_size=2, generate_config=gc, loss_beta=0.1))
    trainer = GRPOTrainer(train_config=cfg, reward_func=reward)
    model = trainer.backend.unwrap(trainer.model)
    # old log-probs (with images) of a rollout equal the training forward's log-probs: ratio 1 at the first step
    micro = trainer.make_rollout_batches(trainer.prompt_batches())
    assert micro
    for b in micro:
        assert b["pixel_values"].shape[0] == int(b["image_counts"].sum())
        assert (b["input_ids"] == IMG).sum(1).tolist() == [TPI * int(c) for c in b["image_counts"]]
        out = trainer.compute_loss(trainer.model, trainer.to_device(b))
        assert abs(out.extra["ratio_mean"] - 1.0) < 1e-5
        assert abs(out.extra["kl"]) < 1e-6
    assert all(sum(1 for t in p if t == IMG) in (TPI, 2 * TPI) for p in seen["prompts"])
    before = _snapshot(model)
    trainer.rollouts_done = 0
    stats = trainer.train()
    assert np.isfinite(stats["loss"])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert any(n.startswith("projector.") for n in changed)
