"""The VLM quickstart (``llm-trainer quickstart --vlm``): a tiny vision-language model learns to answer questions
about images it has never seen, trained from scratch on pictures this module draws itself.

Each picture (black background) holds one to four shapes (square, circle or triangle) of one colour (red, green,
blue or yellow), each in its own cell of a 4x4 grid with a random size and offset. A sample asks either
``how many shapes?`` (answer ``1``..``4``) or ``what colour?`` (answer ``red``/``green``/``blue``/``yellow``), so
guessing gives 25 % (the chance level reported). Held-out questions are half of each kind; training questions are
two thirds counting (the harder skill: colour is learnt within an epoch, counting after several). Pipeline: draw images → chat jsonl with an ``images`` column →
train a tokenizer (its ``<image>`` token is the VLM's ``image_token_id``) → ``prepare_data(image_field="images")``
→ SFT of a fresh `VlmModel` (vision tower + projector + language model) → held-out accuracy with greedy generation
from the image, before and after training.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 255), "yellow": (240, 220, 40)}
SHAPES = ("square", "circle", "triangle")
QUESTIONS = {"count": "how many shapes?", "colour": "what colour?"}
CHANCE = 0.25


@dataclass(frozen=True)
class VlmQuickstartSize:
    n_train: int
    n_test: int
    image_size: int
    patch_size: int
    tokens_per_image: int
    vision_hidden: int
    vision_layers: int
    hidden: int
    layers: int
    heads: int
    epochs: int
    batch_size: int
    lr: float
    count_share: float = 2 / 3   # share of "how many shapes?" training questions (counting is the harder skill)


SIZES = {
    "full": VlmQuickstartSize(n_train=7000, n_test=200, image_size=32, patch_size=8, tokens_per_image=16,
                              vision_hidden=64, vision_layers=2, hidden=64, layers=2, heads=4, epochs=9,
                              batch_size=32, lr=3e-3),
    "tiny": VlmQuickstartSize(n_train=24, n_test=6, image_size=16, patch_size=8, tokens_per_image=4,
                              vision_hidden=32, vision_layers=1, hidden=32, layers=1, heads=2, epochs=1,
                              batch_size=8, lr=1e-3, count_share=0.5),
}


def draw_image(rng: random.Random, size: int, count: int, colour: str):
    """A picture with ``count`` shapes of ``colour``, each in a distinct cell of a 4x4 grid."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    cell = size // 4
    rgb = COLOURS[colour]
    for c in rng.sample(range(16), count):
        side = rng.randint(max(2, cell * 5 // 8), cell - 1)
        x0 = (c % 4) * cell + rng.randint(0, cell - side)
        y0 = (c // 4) * cell + rng.randint(0, cell - side)
        box = (x0, y0, x0 + side - 1, y0 + side - 1)
        shape = rng.choice(SHAPES)
        if shape == "square":
            draw.rectangle(box, fill=rgb)
        elif shape == "circle":
            draw.ellipse(box, fill=rgb)
        else:
            draw.polygon([(x0, y0 + side - 1), (x0 + side - 1, y0 + side - 1), (x0 + (side - 1) / 2, y0)], fill=rgb)
    return img


def write_vlm_task(folder: Path, n_train: int, n_test: int, image_size: int, seed: int = 0,
                   count_share: float = 0.5) -> dict[str, Any]:
    """Images under ``folder/images`` and ``train.jsonl`` / ``test.jsonl`` chat records with an ``images``
    column (absolute paths). Returns the paths and the held-out samples ``(question, answer, image)``."""
    rng = random.Random(seed)
    img_dir = folder / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"test_samples": []}
    for split, n in (("train", n_train), ("test", n_test)):
        path = folder / f"{split}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for i in range(n):
                count, colour = rng.randint(1, 4), rng.choice(sorted(COLOURS))
                image = (img_dir / f"{split}_{i:05d}.png").resolve()
                draw_image(rng, image_size, count, colour).save(image)
                share = count_share if split == "train" else 0.5    # held out: half of each kind
                kind = "count" if math.ceil((i + 1) * share) > math.ceil(i * share) else "colour"
                answer = str(count) if kind == "count" else colour
                question = "<image>\n" + QUESTIONS[kind]
                f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                                 {"role": "assistant", "content": answer}],
                                    "images": [str(image)]}) + "\n")
                if split == "test":
                    out["test_samples"].append((question, answer, str(image)))
        out[split] = path
    return out


def vlm_accuracy(model, tokenizer, samples, batch_size: int = 64) -> dict[str, float]:
    """Greedy answers from the images: exact match of the first word, overall and per question kind."""
    from ..generation import GenerateConfig, generate
    from ..images import DefaultPixelValuesProvider
    from ..model.vlm import expand_image_tokens

    cfg = model.config
    provider = DefaultPixelValuesProvider.from_vision_config(cfg)
    gen = GenerateConfig(max_new_tokens=4, do_sample=False)
    stops = [t for t in (tokenizer.token_to_id("<|im_end|>"), tokenizer.eos_token_id) if t is not None]
    hits = {"count": [], "colour": []}
    for s in range(0, len(samples), batch_size):
        chunk = samples[s:s + batch_size]
        prompts = [expand_image_tokens(tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                                     add_generation_prompt=True).input_ids,
                                       cfg.image_token_id, cfg.tokens_per_image) for q, _, _ in chunk]
        pixels = provider([img for _, _, img in chunk])
        out = generate(model, prompts, gen, eos_token_ids=stops, pad_token_id=tokenizer.pad_token_id or 0,
                       pixel_values=pixels)
        for (q, answer, _), comp in zip(chunk, out.completions):
            words = tokenizer.decode(comp).split()
            kind = "count" if q.endswith(QUESTIONS["count"]) else "colour"
            hits[kind].append(float(bool(words) and words[0] == answer))
    every = hits["count"] + hits["colour"]
    return {"accuracy": sum(every) / max(len(every), 1),
            "count_accuracy": sum(hits["count"]) / max(len(hits["count"]), 1),
            "colour_accuracy": sum(hits["colour"]) / max(len(hits["colour"]), 1)}


def run_vlm_quickstart(output_dir: str | Path = "runs/quickstart_vlm", size: str = "full",
                       seed: int = 0) -> dict[str, Any]:
    """Draw the data, train a tokenizer and a tiny VLM, print and return held-out accuracy before and after
    (also written to ``results.json``)."""
    import torch

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    # The matrices here are tiny: on a CPU, one intra-op thread is as fast as several and does not stall when the
    # cores are shared (OpenMP barriers of an oversubscribed machine made steps ~10x slower in our measurements).
    threads = torch.get_num_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    try:
        return _run(Path(output_dir), SIZES[size], size, seed)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, sz: VlmQuickstartSize, size: str, seed: int) -> dict[str, Any]:
    import torch

    from ..configs import OptimConfig, SFTConfig, TrainConfig
    from ..data import prepare_data
    from ..model import VisionConfig, VLMConfig, VlmModel
    from ..tokenizer import Tokenizer, train_tokenizer
    from ..trainers.sft import SFTTrainer

    t0 = time.perf_counter()
    say = lambda msg: print(f"[vlm quickstart {time.perf_counter() - t0:6.1f}s] {msg}", flush=True)  # noqa: E731

    files = write_vlm_task(out / "data", sz.n_train, sz.n_test, sz.image_size, seed=seed,
                           count_share=sz.count_share)
    test = files["test_samples"]
    say(f"{sz.n_train} training and {len(test)} held-out pictures drawn under {out / 'data' / 'images'}")
    tok_dir = out / "tokenizer"
    train_tokenizer([files["train"]], vocab_size=320, output_dir=tok_dir, template="chatml", show_progress=False)
    tok = Tokenizer(tok_dir)
    say(f"tokenizer trained: vocab {tok.vocab_size}, image token {tok.image_token!r} = id {tok.image_token_id}")
    prepare_data("sft", tok, files["train"], out / "data" / "sft_tokens", image_field="images", progress=False)
    say("data prepared (token ids + image paths)")

    vision = VisionConfig(hidden_size=sz.vision_hidden, intermediate_size=2 * sz.vision_hidden,
                          num_hidden_layers=sz.vision_layers, num_attention_heads=sz.heads,
                          image_size=sz.image_size, patch_size=sz.patch_size)
    model_config = VLMConfig(vocab_size=tok.vocab_size, hidden_size=sz.hidden, intermediate_size=2 * sz.hidden,
                             num_hidden_layers=sz.layers, num_attention_heads=sz.heads,
                             num_key_value_heads=sz.heads, max_position_embeddings=128, tie_word_embeddings=True,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, vision_config=vision,
                             image_token_id=tok.image_token_id, tokens_per_image=sz.tokens_per_image)
    torch.manual_seed(seed)
    before = vlm_accuracy(VlmModel(model_config).eval(), tok, test)
    say(f"before training: held-out accuracy {before['accuracy']:.3f} (chance {CHANCE:.2f})")

    steps_per_epoch = sz.n_train // sz.batch_size
    cfg = TrainConfig(output_dir=str(out / "sft"), tokenizer=str(tok_dir), model_config=model_config,
                      file_dataset=[str(out / "data" / "sft_tokens")], dataset_block_size=64, ds_config=None,
                      dtype="fp32", batch_size=sz.batch_size, n_epochs=sz.epochs, seed=seed,
                      log_interval=max(1, steps_per_epoch // 2), save_interval=None, eval_interval=10_000,
                      optim_config=OptimConfig(initial_lr=sz.lr / 10, max_lr=sz.lr, min_lr=sz.lr / 20,
                                               warmup_iters=max(1, steps_per_epoch // 2), weight_decay=0.01,
                                               enable_lr_scheduler=True),
                      sft_config=SFTConfig(mask_prompt=True))
    q0, a0, img0 = test[0]
    trainer = SFTTrainer(train_config=cfg, eval_prompts=[q0.replace("<image>\n", "")], eval_image_tags=[[img0]])
    trainer.train()
    say(f"SFT done ({trainer.global_step} steps); sample: {QUESTIONS['count' if 'many' in q0 else 'colour']!r} "
        f"-> expected {a0!r}")
    model = VlmModel.from_pretrained(out / "sft" / "final").eval()
    after = vlm_accuracy(model, tok, test)
    elapsed = time.perf_counter() - t0
    results = {"size": size, "n_train": sz.n_train, "n_test": len(test), "chance": CHANCE,
               "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
               "count_accuracy_after": after["count_accuracy"], "colour_accuracy_after": after["colour_accuracy"],
               "steps": trainer.global_step, "seconds": round(elapsed, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    say(f"held-out accuracy: before {before['accuracy']:.3f} → after {after['accuracy']:.3f} "
        f"(count {after['count_accuracy']:.3f}, colour {after['colour_accuracy']:.3f}; chance {CHANCE:.2f})")
    say(f"finished in {elapsed:.0f}s; results in {out / 'results.json'}")
    return results
