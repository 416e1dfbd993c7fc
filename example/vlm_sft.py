"""Vision-language SFT: a ViT image encoder + projector in front of a language model, trained on image chats.

    python example/vlm_sft.py                                    # tiny VLM from scratch on drawn shapes (CPU, ~2 min)
    python example/vlm_sft.py --data chats.jsonl --image-field images
    python example/vlm_sft.py --llm runs/sft_example/final --vision siglip-base-patch16-224/ --freeze-llm

The data is jsonl: a ``messages`` list whose user turns contain one ``<image>`` placeholder per image, and an
image column (``--image-field``, a path or a list of paths per record). Each placeholder becomes
``--tokens-per-image`` image tokens whose embeddings are the projected vision features; they are never trained
on. ``--llm`` + ``--vision`` start from a pretrained language model folder and a SigLIP/CLIP vision folder (only
the projector is new); ``--freeze-llm`` then trains just the projector (add ``--freeze-vision`` to keep the
encoder fixed too). Without ``--data`` the synthetic shapes task of ``llm-trainer quickstart --vlm`` is drawn.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from llm_trainer import OptimConfig, SFTConfig, SFTTrainer, TrainConfig, VisionConfig, VLMConfig, VlmModel
from llm_trainer.data import prepare_data
from llm_trainer.quickstart.vlm import vlm_accuracy, write_vlm_task
from llm_trainer.tokenizer import Tokenizer, train_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/vlm_sft_example")
    ap.add_argument("--data", default=None, help="chat jsonl with an image column (default: drawn shapes)")
    ap.add_argument("--image-field", default="images")
    ap.add_argument("--llm", default=None, help="pretrained LLM folder (its tokenizer needs an <image> token)")
    ap.add_argument("--vision", default=None, help="SigLIP/CLIP vision folder (config.json + safetensors)")
    ap.add_argument("--tokens-per-image", type=int, default=16)
    ap.add_argument("--n-images", type=int, default=2000, help="synthetic training pictures (without --data)")
    ap.add_argument("--freeze-llm", action="store_true")
    ap.add_argument("--freeze-vision", action="store_true")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    if bool(args.llm) != bool(args.vision):
        ap.error("--llm and --vision go together (a pretrained language model and a pretrained vision tower)")

    out = Path(args.out)
    test = []
    chats = args.data
    if chats is None:
        task = write_vlm_task(out / "data", n_train=args.n_images, n_test=max(8, args.n_images // 20),
                              image_size=32)
        chats, test = task["train"], task["test_samples"]

    # tokenizer: the pretrained model's, or a new one whose <image> special token is the image placeholder
    tok_dir = Path(args.llm) if args.llm else out / "tokenizer"
    if args.llm is None:
        train_tokenizer([chats], vocab_size=320, output_dir=tok_dir, template="chatml", show_progress=False)
    tok = Tokenizer(tok_dir)
    if tok.image_token_id is None:
        raise SystemExit(f"the tokenizer in {tok_dir} has no <image> token; add one before training a VLM")
    data = out / "data" / "sft_tokens"
    prepare_data("sft", tok, chats, data, image_field=args.image_field, max_length=256)

    init = None
    if args.llm and args.vision:
        model = VlmModel.from_pretrained_parts(args.llm, args.vision, image_token_id=tok.image_token_id,
                                               tokens_per_image=args.tokens_per_image)
        init = out / "init"
        model.save_pretrained(init)                # the trainer loads a VLM folder like any model folder
        model_config = None
    else:
        vision = VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
        model_config = VLMConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=512, tie_word_embeddings=True,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                 vision_config=vision, image_token_id=tok.image_token_id,
                                 tokens_per_image=args.tokens_per_image)

    config = TrainConfig(
        init_weights_path=str(init) if init else None, model_config=model_config, tokenizer=str(tok_dir),
        file_dataset=[str(data)], dataset_block_size=256, batch_size=args.batch_size, n_epochs=args.epochs,
        max_steps=args.max_steps, output_dir=str(out / "sft"), ds_config=None, dtype="fp32",
        optim_config=OptimConfig(initial_lr=args.lr),
        sft_config=SFTConfig(mask_prompt=True, freeze_llm_model=args.freeze_llm,
                             freeze_vision_encoder=args.freeze_vision),
        save_interval=None, eval_interval=10_000, log_interval=10)
    eval_prompts, eval_images = [], None
    if test:
        eval_prompts = [q.replace("<image>\n", "") for q, _, _ in test[:2]]
        eval_images = [[img] for _, _, img in test[:2]]
    SFTTrainer(train_config=config, eval_prompts=eval_prompts, eval_image_tags=eval_images).train()

    model = VlmModel.from_pretrained(out / "sft" / "final")
    if test:
        acc = vlm_accuracy(model, tok, test)
        print(json.dumps({"held_out": acc}))
    print(f"VLM saved to {out / 'sft' / 'final'} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
