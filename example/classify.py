"""Sequence classification on a synthetic task: is the arithmetic statement ``a+b=c`` true or false?

    python example/classify.py                                  # self-contained: tokenizer + tiny model from scratch
    python example/classify.py --init runs/sft/final --tokenizer runs/sft/final   # a classifier head on an SFT model
    python example/classify.py --trainable head                 # train the head only (or last_blocks, --blocks N)
    python example/classify.py --lora                           # LoRA adapters + the head

Steps: write the task's jsonl files (``llm_trainer.quickstart.task.write_classify_files``: one true and one false
statement per problem; held-out statements use operand pairs never seen in training), train a small tokenizer unless
one is given, ``prepare_data classify`` (string labels → ids, the held-out split reuses the training ids), then
``ClassificationTrainer``. Before and after training it prints the held-out accuracy and macro-F1; the confusion
matrix goes to ``<out>/run/confusion_matrix.png`` and ``metrics.jsonl``. The export ``<out>/run/final`` is a
transformers ``*ForSequenceClassification`` folder; the script loads it back and classifies a few statements.

Multi-GPU: ``torchrun --nproc-per-node=N example/classify.py --zero 3`` (or the ``ds_train`` launcher).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/classify_example")
    ap.add_argument("--init", default=None, help="HF-format model folder to start from (e.g. an SFT export)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: train a small one)")
    ap.add_argument("--trainable", default="all", choices=["all", "head", "last_blocks"])
    ap.add_argument("--blocks", type=int, default=1, help="decoder blocks trained with --trainable last_blocks")
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--zero", type=int, default=None, choices=[0, 1, 2, 3])
    ap.add_argument("--max-operand", type=int, default=19)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()

    from llm_trainer import (ClassificationTrainer, ClassifyConfig, LoRAConfig, ModelConfig, OptimConfig,
                             SequenceClassifier, TrainConfig)
    from llm_trainer.data.prepare import prepare
    from llm_trainer.quickstart.task import write_classify_files
    from llm_trainer.tokenizer import Tokenizer, train_tokenizer

    out = Path(args.out)
    data = out / "data"
    if int(os.environ.get("RANK", "0")) == 0:       # files are written once; other ranks wait for them below
        files = write_classify_files(data, seed=0, max_operand=args.max_operand)
        tok_dir = args.tokenizer
        if tok_dir is None:
            tok_dir = str(out / "tokenizer")
            train_tokenizer([str(files["classify"])], vocab_size=300, output_dir=tok_dir, show_progress=False)
        tok = Tokenizer(tok_dir)
        prepare("classify", tok, files["classify"], data / "train", template="chatml", progress=False)
        prepare("classify", tok, files["classify_test"], data / "held", template="chatml", labels=data / "train",
                progress=False)
        (out / "ready.json").write_text(json.dumps({"tokenizer": tok_dir}))
    else:
        import time
        while not (out / "ready.json").exists():
            time.sleep(0.5)
    tok_dir = json.loads((out / "ready.json").read_text())["tokenizer"]
    tok = Tokenizer(tok_dir)

    ds_config = None
    if args.zero is not None:
        from llm_trainer import DsConfig
        ds_config = DsConfig.from_dict({"zero_config": {"stage": args.zero}})
    cfg = TrainConfig(
        model_config=ModelConfig(vocab_size=tok.vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        init_weights_path=args.init, tokenizer=tok_dir, file_dataset=str(data / "train"),
        eval_file_dataset=str(data / "held"), batch_size=args.batch_size, n_epochs=100, max_steps=args.steps,
        output_dir=str(out / "run"), dtype="auto", ds_config=ds_config, save_interval=None,
        eval_interval=max(1, args.steps // 3), log_interval=10, lora=LoRAConfig(r=8, alpha=16) if args.lora else None,
        optim_config=OptimConfig(initial_lr=args.lr, enable_lr_scheduler=False, weight_decay=0.0),
        classify_config=ClassifyConfig(trainable=args.trainable, trainable_blocks=args.blocks),
    )
    trainer = ClassificationTrainer(train_config=cfg)

    def report(tag: str) -> None:
        m = trainer.classification_metrics()         # the held-out statements (the eval dataset), every rank
        if trainer.backend.is_main:
            print(f"[{tag}] held-out accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}, loss "
                  f"{m['loss']:.4f}; confusion matrix (rows true {trainer.label_names}) {m['confusion_matrix']}",
                  flush=True)

    report("before")
    trainer.train()
    report("after")
    if trainer.backend.is_main:
        final = out / "run" / "final"
        model = SequenceClassifier.from_pretrained(final)
        statements = ["3+4=7", "3+4=8", "12+5=17", "12+5=71"]
        ids = [tok.apply_chat_template([{"role": "user", "content": s}], add_generation_prompt=True,
                                       template="chatml").input_ids for s in statements]
        predicted = model.predict(ids, pad_token_id=tok.pad_token_id).argmax(-1).tolist()
        print("exported classifier: " + ", ".join(f"{s} -> {model.label_names[p]}"
                                                  for s, p in zip(statements, predicted)))
        print(f"exported to {final} (transformers: AutoModelForSequenceClassification.from_pretrained)")


if __name__ == "__main__":
    main()
