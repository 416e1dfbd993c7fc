"""PPO on the synthetic arithmetic task: a value model, GAE, a KL penalty to the warm-up model in the reward.

    python example/ppo.py                                        # self-contained: tokenizer, short SFT warm-up, PPO
    python example/ppo.py --init runs/sft_example/final          # start from an SFT export (its tokenizer is used)
    python example/ppo.py --value-head                           # value head on the policy instead of a value model
    python example/ppo.py --adaptive-kl 0.5                      # adaptive KL coefficient with this target
    python example/ppo.py --reward-model runs/reward/final       # score with a RewardModel (same tokenizer) too

Steps: as ``example/grpo.py`` (task files, tokenizer, ``prepare_data('rl', ...)``, a short ``SFTTrainer`` warm-up
unless ``--init``), then ``PPOTrainer``: one completion per prompt, the reward (exact match, minus
``--missing-eos-penalty`` for completions cut at the length limit) minus ``β·KL`` to the reference per token, GAE
(γ, λ) with a bootstrap value for truncated completions, clipped policy and value losses; the value model is a copy
of the policy's backbone with its own optimizer settings (``--value-lr``). Before and after it prints the mean
reward of sampled completions on the training prompts and the greedy accuracy on held-out problems.

Multi-GPU: ``torchrun --nproc-per-node=N example/ppo.py [--zero 3]``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from llm_trainer import (AdaptiveKLConfig, ModelConfig, OptimConfig, PPOConfig, PPOTrainer, SFTConfig, SFTTrainer,
                         TrainConfig)
from llm_trainer.generation import GenerateConfig
from llm_trainer.quickstart.task import correct, prepare_task_data
from llm_trainer.tokenizer import Tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/ppo_example")
    ap.add_argument("--init", default=None, help="HF-format model folder to start from (skips the SFT warm-up)")
    ap.add_argument("--max-operand", type=int, default=9, help="problems a+b with 0 <= a, b <= this")
    ap.add_argument("--sft-steps", type=int, default=150, help="warm-up steps when there is no --init")
    ap.add_argument("--steps", type=int, default=40, help="PPO optimizer steps")
    ap.add_argument("--batch-size", type=int, default=32, help="prompts (= completions) per rollout (per rank)")
    ap.add_argument("--ppo-epochs", type=int, default=2, help="passes over each rollout")
    ap.add_argument("--mini-batch", type=int, default=16, help="samples per optimizer step")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--value-lr", type=float, default=1e-3)
    ap.add_argument("--kl-beta", type=float, default=0.02)
    ap.add_argument("--kl-estimator", default="k1", choices=["k1", "k2", "k3"])
    ap.add_argument("--adaptive-kl", type=float, default=None, metavar="TARGET", help="adaptive β with this KL target")
    ap.add_argument("--value-head", action="store_true", help="value head on the policy (no separate value model)")
    ap.add_argument("--gamma", type=float, default=1.0)
    ap.add_argument("--lam", type=float, default=0.95)
    ap.add_argument("--missing-eos-penalty", type=float, default=1.0)
    ap.add_argument("--reward-model", default=None, help="a RewardModel folder, added to the exact-match reward")
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

    rewards, weights = [correct], [1.0]
    if args.reward_model:
        from llm_trainer import RewardModel
        rewards.append(RewardModel.from_pretrained(args.reward_model))
        weights.append(0.1)
    cfg = TrainConfig(
        init_weights_path=init, tokenizer=tok_dir,
        file_dataset=str(out / "data" / "rl_tokens"), eval_file_dataset=str(out / "data" / "test_tokens"),
        batch_size=args.batch_size, n_epochs=1000, max_steps=args.steps, output_dir=str(out / "ppo"),
        ds_config=ds_config, save_interval=None, eval_interval=None, log_interval=5, seed=args.seed,
        optim_config=OptimConfig(initial_lr=args.lr, enable_lr_scheduler=False, weight_decay=0.0),
        ppo_config=PPOConfig(
            ppo_epochs=args.ppo_epochs, ppo_batch_size=args.mini_batch, value_head_on_policy=args.value_head,
            value_optim_config=OptimConfig(initial_lr=args.value_lr, enable_lr_scheduler=False, weight_decay=0.0),
            kl_beta=args.kl_beta, kl_estimator=args.kl_estimator,
            adaptive_kl=AdaptiveKLConfig(target=args.adaptive_kl) if args.adaptive_kl else None,
            gamma=args.gamma, lam=args.lam, vf_coef=0.5, missing_eos_penalty=args.missing_eos_penalty,
            generate_config=GenerateConfig(max_new_tokens=args.max_new_tokens, temperature=1.0)),
    )
    trainer = PPOTrainer(train_config=cfg, reward_func=rewards, reward_weights=weights, eval_prompts=["3+4=?"])
    train_items = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    test_items = [trainer.eval_dataset[i] for i in range(len(trainer.eval_dataset))]

    def report(tag: str) -> None:
        # collective under ZeRO-3 / DDP (every rank calls it); each rank scores its share, results are all-reduced
        rank, world = trainer.backend.rank, trainer.backend.world_size
        key = "eval_reward/correct" if len(rewards) > 1 else "eval_reward"        # the exact-match part
        sampled = trainer.evaluate_rewards(train_items[rank::world] * 4, greedy=False)[key]
        held_out = trainer.evaluate_rewards(test_items[rank::world])[key]
        if trainer.backend.is_main:
            print(f"[{tag}] mean reward of sampled completions (training prompts): {sampled:.3f}; "
                  f"held-out greedy accuracy: {held_out:.3f}", flush=True)

    report("before")
    trainer.train()
    report("after")
    if trainer.backend.is_main:
        print(f"exported to {out / 'ppo' / 'final'} (value model: {out / 'ppo' / 'value_model'})")


if __name__ == "__main__":
    main()
