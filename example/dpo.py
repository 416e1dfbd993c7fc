"""DPO on the synthetic arithmetic task: prefer the right sum over a wrong one.

    python example/dpo.py                                   # self-contained: tokenizer + tiny model from scratch
    python example/dpo.py --init runs/sft/final --tokenizer runs/sft/final   # continue from an SFT model
    python example/dpo.py --loss-type simpo --beta 2.0      # any of dpo|ipo|hinge|robust|orpo|simpo
    python example/dpo.py --lora                            # LoRA-DPO: the reference is the base model, no copy

Steps: write the task's jsonl files (``llm_trainer.quickstart.task``), train a small byte-level BPE tokenizer unless
one is given, tokenise the preference pairs with ``prepare('dpo', ...)`` (chat template, prompt masked), then
``DPOTrainer``. Before and after training it prints the preference accuracy (chosen reward > rejected reward) and
the mean reward margin on held-out problems (operand pairs never seen in training), and greedy answers to a few
held-out questions (``exact match``). From a random model (the default) DPO learns the training pairs but says
little about held-out sums and cannot make the model answer; start from an SFT model (``--init``) for that.

Multi-GPU: launch the same script with ``torchrun --nproc-per-node=N`` (or the ``llm_trainer`` launcher) and pass
``--zero 2`` or ``--zero 3``; the reference model is then partitioned too under ZeRO-3.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/dpo_example")
    ap.add_argument("--init", default=None, help="HF-format model folder to start from (e.g. an SFT export)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: train a small one)")
    ap.add_argument("--loss-type", default="dpo")
    ap.add_argument("--beta", type=float, default=None, help="default: 2.0 for simpo, 0.1 otherwise")
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--nll-coef", type=float, default=None)
    ap.add_argument("--precompute-ref", action="store_true")
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--zero", type=int, default=None, choices=[0, 1, 2, 3])
    ap.add_argument("--max-operand", type=int, default=19)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()

    from llm_trainer import DPOConfig, LoRAConfig, ModelConfig, OptimConfig, TrainConfig
    from llm_trainer.data.prepare import prepare
    from llm_trainer.quickstart.task import chat_prompt, split_problems, wrong_answer, write_jsonl, write_task_files
    from llm_trainer.tokenizer import Tokenizer, train_tokenizer
    from llm_trainer.trainers.dpo import DPOTrainer

    out = Path(args.out)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    data_dir = out / "data"
    if rank0:  # files are written once; other ranks wait for them below
        files = write_task_files(data_dir, seed=0, max_operand=args.max_operand, pretrain_repeats=1)
        _, held = split_problems(args.max_operand, seed=0)
        rng = random.Random(1)
        write_jsonl(data_dir / "dpo_heldout.jsonl", ({"prompt": chat_prompt(p), "chosen": str(p.answer),
                                                      "rejected": str(wrong_answer(p, rng))} for p in held))
        tok_dir = args.tokenizer
        if tok_dir is None:
            tok_dir = str(out / "tokenizer")
            train_tokenizer([str(files["sft"])], vocab_size=320, output_dir=tok_dir, show_progress=False)
        tok = Tokenizer(tok_dir)
        for name, src in (("dpo", files["dpo"]), ("dpo_heldout", data_dir / "dpo_heldout.jsonl")):
            prepare("dpo", tok, str(src), str(data_dir / f"{name}_tok"), progress=False)
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
    model_config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    beta = args.beta if args.beta is not None else (2.0 if args.loss_type == "simpo" else 0.1)
    cfg = TrainConfig(
        model_config=model_config, init_weights_path=args.init, tokenizer=tok_dir,
        file_dataset=str(data_dir / "dpo_tok"), eval_file_dataset=str(data_dir / "dpo_heldout_tok"),
        batch_size=args.batch_size, n_epochs=100, max_steps=args.steps, output_dir=str(out / "run"),
        dtype="auto", ds_config=ds_config, save_interval=None, eval_interval=None, log_interval=10,
        lora=LoRAConfig(r=8, alpha=16) if args.lora else None,
        optim_config=OptimConfig(initial_lr=args.lr, enable_lr_scheduler=False, weight_decay=0.0),
        dpo_config=DPOConfig(loss_type=args.loss_type, loss_beta=beta, loss_label_smoothing=args.label_smoothing,
                             nll_loss_coef=args.nll_coef, precompute_ref_log_probs=args.precompute_ref),
    )
    trainer = DPOTrainer(train_config=cfg, eval_prompts=["3+4=?", "12+7=?"])

    def report(tag: str) -> None:
        m = trainer.preference_accuracy()          # held-out pairs (the eval dataset)
        t = trainer.preference_accuracy(trainer.train_dataset)
        em = exact_match(trainer, tok, args.max_operand)
        if trainer.backend.is_main:
            print(f"[{tag}] preference accuracy: train {t['rewards/accuracy']:.3f} (margin {t['rewards/margin']:.3f}), "
                  f"held-out {m['rewards/accuracy']:.3f} (margin {m['rewards/margin']:.3f}, loss {m['loss']:.4f}); "
                  f"greedy exact match {em:.3f}", flush=True)

    report("before")
    trainer.train()
    report("after")
    if trainer.backend.is_main:
        print(f"exported to {out / 'run' / 'final'}")


def exact_match(trainer, tok, max_operand: int, n: int = 32) -> float:
    """Greedy answers to the first ``n`` held-out questions (collective under ZeRO-3: every rank calls it)."""
    from llm_trainer.generation import GenerateConfig, generate
    from llm_trainer.quickstart.task import chat_prompt, exact_match as em, split_problems
    _, held = split_problems(max_operand, seed=0)
    held = held[:n]
    prompts = [tok.apply_chat_template(chat_prompt(p), add_generation_prompt=True).input_ids for p in held]
    with trainer.backend.gathered_for_generation(trainer.model) as model:
        was = model.training
        model.eval()
        res = generate(model, prompts, GenerateConfig(max_new_tokens=6, do_sample=False),
                       eos_token_ids=trainer.stop_token_ids(), pad_token_id=trainer.pad_token_id())
        model.train(was)
    return sum(em(tok.decode(c), str(p.answer)) for p, c in zip(held, res.completions)) / len(held)


if __name__ == "__main__":
    main()
