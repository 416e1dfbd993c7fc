"""Pretrain a small Qwen-style model from scratch.

    python example/pretrain.py                                # self-contained: writes its own corpus and tokenizer
    python example/pretrain.py --data corpus.jsonl --tokenizer tok/   # your jsonl ({"text": ...}) and tokenizer
    ddp_train --nproc 2 example/pretrain.py                   # the same script on 2 processes (DDP)
    ds_train --nproc 2 example/pretrain.py --zero 2           # or DeepSpeed ZeRO-2

The corpus is tokenised once into a memory-mapped ``.npy`` (``prepare_data``); training writes checkpoints,
``metrics.jsonl``, sample generations and, at the end, a Hugging Face-format model folder in ``<out>/final``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from llm_trainer import ModelConfig, OptimConfig, PretrainConfig, Trainer, TrainConfig
from llm_trainer.data import prepare_data
from llm_trainer.quickstart.task import write_task_files
from llm_trainer.tokenizer import Tokenizer, train_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/pretrain_example")
    ap.add_argument("--data", default=None, help="jsonl with a 'text' field (default: a synthetic corpus)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: train one on the data)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--zero", type=int, default=None, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage")
    args = ap.parse_args()

    out = Path(args.out)
    tokens = out / "data" / "pretrain_tokens.npy"
    tok_dir = Path(args.tokenizer) if args.tokenizer else out / "tokenizer"
    if int(os.environ.get("RANK", "0")) == 0 and not tokens.exists():   # prepare once; ranks > 0 wait in barrier
        data = args.data or write_task_files(out / "data")["pretrain"]
        if args.tokenizer is None:
            train_tokenizer([data], vocab_size=384, output_dir=tok_dir, show_progress=False)
        prepare_data("pretrain", Tokenizer(tok_dir), data, tokens)
    _wait_for(tokens)

    ds_config = None
    if args.zero is not None:
        from llm_trainer import DsConfig
        ds_config = DsConfig.from_dict({"zero_config": {"stage": args.zero}})
    config = TrainConfig(
        model_config=ModelConfig(vocab_size=Tokenizer(tok_dir).vocab_size, hidden_size=args.hidden,
                                 num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=args.block_size * 2, tie_word_embeddings=True),
        tokenizer=str(tok_dir), file_dataset=[str(tokens)], dataset_block_size=args.block_size,
        batch_size=args.batch_size, max_steps=args.steps, output_dir=str(out), ds_config=ds_config,
        optim_config=OptimConfig(initial_lr=args.lr),
        pretrain_config=PretrainConfig(gradient_accumulation_steps=1),
        eval_interval=max(1, args.steps // 2), save_interval=max(1, args.steps // 2), resume_from="auto")
    Trainer(train_config=config, eval_prompts=["12+7=", "3 plus 4 is"]).train()


def _wait_for(path: Path) -> None:
    import time
    while not path.exists():
        time.sleep(0.2)


if __name__ == "__main__":
    main()
