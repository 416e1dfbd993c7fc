"""GRPO on the synthetic arithmetic task: reward 1 when the answer to ``a+b=?`` is right.

    python example/grpo.py                                       # self-contained: tokenizer, short SFT warm-up, GRPO
    python example/grpo.py --init runs/sft_example/final         # start from an SFT export (its tokenizer is used)
    python example/grpo.py --loss-type dapo --clip-high 0.28     # DAPO: token-level loss, clip-higher
    python example/grpo.py --loss-type dr_grpo --no-scale-rewards
    python example/grpo.py --gspo                                # GSPO: sequence-level importance ratio
    python example/grpo.py --beta 0.04                           # KL to the reference (the warm-up model)

Steps: write the task's jsonl files (``llm_trainer.quickstart.task``), train a small byte-level BPE tokenizer,
tokenise the RL prompts with ``prepare_data('rl', ...)`` (chat template + reference answers). RL needs a policy that
is sometimes right (a random model never is, and gets no signal), so without ``--init`` a tiny model is first
supervised for ``--sft-steps`` steps with ``SFTTrainer``. Then ``GRPOTrainer``: ``--group-size`` completions per
prompt, group-normalised advantages, the clipped objective. Before and after it prints the mean reward of sampled
completions on the training prompts (what GRPO maximises) and the greedy accuracy on held-out problems.

Multi-GPU: ``torchrun --nproc-per-node=N example/grpo.py [--zero 3]``: every rank samples its own prompts and
completions; the update is synchronised.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from llm_trainer import GRPOConfig, GRPOTrainer, ModelConfig, OptimConfig, SFTConfig, SFTTrainer, TrainConfig
from llm_trainer.generation import GenerateConfig
from llm_trainer.quickstart.task import correct, prepare_task_data
from llm_trainer.tokenizer import Tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/grpo_example")
    ap.add_argument("--init", default=None, help="HF-format model folder to start from (skips the SFT warm-up)")
    ap.add_argument("--max-operand", type=int, default=9, help="problems a+b with 0 <= a, b <= this")
    ap.add_argument("--sft-steps", type=int, default=150, help="warm-up steps when there is no --init")
    ap.add_argument("--steps", type=int, default=30, help="GRPO optimizer steps")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per rollout (per rank)")
    ap.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--loss-type", default="grpo", choices=["grpo", "bnpo", "dr_grpo", "dapo", "cispo"])
    ap.add_argument("--beta", type=float, default=0.0, help="KL weight (0: no reference model)")
    ap.add_argument("--clip-high", type=float, default=None, help="upper clip range (default: symmetric 0.2)")
    ap.add_argument("--no-scale-rewards", action="store_true", help="advantages not divided by the group std")
    ap.add_argument("--gspo", action="store_true", help="sequence-level importance ratio (GSPO)")
    ap.add_argument("--epochs", type=int, default=1, help="passes over each rollout")
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--zero", type=int, default=None, choices=[0, 1, 2, 3])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    out = Path(args.out)
    tok_dir = prepare_task_data(out, args.max_operand, args.init)
    tok = Tokenizer(tok_dir)
    ds_config = None
    if args.zero is not None:
        from llm_trainer import DsConfig
        ds_config = DsConfig.from_dict({"zero_config": {"stage": args.zero}})

    init = args.init
    if init is None:                                       # short supervised warm-up of a tiny model
        model_config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=True,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        sft = TrainConfig(model_config=model_config, tokenizer=tok_dir, file_dataset=str(out / "data" / "sft_tokens"),
                          batch_size=32, n_epochs=1000, max_steps=args.sft_steps, output_dir=str(out / "sft"),
                          ds_config=ds_config, save_interval=None, eval_interval=None, log_interval=50,
                          seed=args.seed, optim_config=OptimConfig(initial_lr=3e-3, enable_lr_scheduler=False),
                          sft_config=SFTConfig(mask_prompt=True))
        SFTTrainer(train_config=sft).train()
        init = str(out / "sft" / "final")

    cfg = TrainConfig(
        init_weights_path=init, tokenizer=tok_dir,
        file_dataset=str(out / "data" / "rl_tokens"), eval_file_dataset=str(out / "data" / "test_tokens"),
        batch_size=args.batch_size, n_epochs=1000, max_steps=args.steps, output_dir=str(out / "grpo"),
        ds_config=ds_config, save_interval=None, eval_interval=None, log_interval=5, seed=args.seed,
        optim_config=OptimConfig(initial_lr=args.lr, enable_lr_scheduler=False, weight_decay=0.0),
        grpo_config=GRPOConfig(
            group_size=args.group_size, loss_type=args.loss_type, loss_beta=args.beta, grpo_epochs=args.epochs,
            loss_clip_eps=3e-4 if args.gspo else 0.2,
            loss_clip_eps_high=4e-4 if args.gspo else args.clip_high,
            loss_importance_sampling_level="sequence" if args.gspo else "token",
            scale_rewards=not args.no_scale_rewards,
            generate_config=GenerateConfig(max_new_tokens=args.max_new_tokens, temperature=1.0)),
    )
    trainer = GRPOTrainer(train_config=cfg, reward_func=correct, eval_prompts=["3+4=?"])
    train_items = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    test_items = [trainer.eval_dataset[i] for i in range(len(trainer.eval_dataset))]

    def report(tag: str) -> None:
        # collective under ZeRO-3 / DDP (every rank calls it); each rank scores its share, results are all-reduced
        rank, world = trainer.backend.rank, trainer.backend.world_size
        sampled = trainer.evaluate_rewards(train_items[rank::world] * 4, greedy=False)["eval_reward"]
        held_out = trainer.evaluate_rewards(test_items[rank::world])["eval_reward"]
        if trainer.backend.is_main:
            print(f"[{tag}] mean reward of sampled completions (training prompts): {sampled:.3f}; "
                  f"held-out greedy accuracy: {held_out:.3f}", flush=True)

    report("before")
    trainer.train()
    report("after")
    if trainer.backend.is_main:
        print(f"exported to {out / 'grpo' / 'final'}")


if __name__ == "__main__":
    main()
