"""Supervised fine-tuning on chat data, starting from a pretrained model.

    python example/sft.py --init runs/pretrain_example/final      # continue from example/pretrain.py's export
    python example/sft.py --init Qwen2.5-0.5B-Instruct/ --data chats.jsonl   # any HF-format Llama/Qwen folder
    python example/sft.py --lora                                   # LoRA adapters instead of full fine-tuning

Without ``--init`` a tiny model is built from scratch (a smoke run). The data is jsonl with a ``messages`` list
(``{"role": "user"|"assistant"|"system", "content": ...}``); prompt tokens are masked out of the loss, and with
``--packing`` several conversations share a row without attending to each other.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from llm_trainer import LoRAConfig, ModelConfig, OptimConfig, SFTConfig, SFTTrainer, TrainConfig
from llm_trainer.data import prepare_data
from llm_trainer.quickstart.task import write_task_files
from llm_trainer.tokenizer import Tokenizer, train_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/sft_example")
    ap.add_argument("--init", default=None, help="HF-format model folder (its tokenizer is used too)")
    ap.add_argument("--data", default=None, help="chat jsonl (default: the synthetic arithmetic chats)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--packing", action="store_true")
    ap.add_argument("--lora", action="store_true")
    args = ap.parse_args()

    out = Path(args.out)
    tok_dir = Path(args.init) if args.init else out / "tokenizer"
    data = out / "data" / "sft_tokens"
    if int(os.environ.get("RANK", "0")) == 0 and not data.exists():
        chats = args.data or write_task_files(out / "data", pretrain_repeats=1)["sft"]
        if args.init is None:
            train_tokenizer([chats], vocab_size=384, output_dir=tok_dir, show_progress=False)
        prepare_data("sft", Tokenizer(tok_dir), chats, data, max_length=args.block_size)
    _wait_for(data)

    model_config = None if args.init else ModelConfig(
        vocab_size=Tokenizer(tok_dir).vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=args.block_size * 2, tie_word_embeddings=True)
    config = TrainConfig(
        init_weights_path=args.init, model_config=model_config, tokenizer=str(tok_dir),
        file_dataset=[str(data)], dataset_block_size=args.block_size, batch_size=args.batch_size,
        n_epochs=args.epochs, max_steps=args.max_steps, output_dir=str(out), ds_config=None,
        optim_config=OptimConfig(initial_lr=args.lr),
        sft_config=SFTConfig(mask_prompt=True, packing=args.packing),
        lora=LoRAConfig(r=8, alpha=16) if args.lora else None, resume_from="auto")
    SFTTrainer(train_config=config, eval_prompts=["12+7=?", "30+41=?"]).train()


def _wait_for(path: Path) -> None:
    import time
    while not path.exists():
        time.sleep(0.2)


if __name__ == "__main__":
    main()
