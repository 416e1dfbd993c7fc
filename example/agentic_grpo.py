"""Multi-turn, tool-using GRPO: a tiny model learns to use a calculator for sums it cannot do in its head.

    python example/agentic_grpo.py                          # warm-up, then GRPO with and without the tool, 3 seeds
    python example/agentic_grpo.py --seeds 0 --steps 20     # one seed, longer

The task (``llm_trainer.envs.calculator``): ``a+b=?`` with 3-digit operands. With the calculator the policy writes a
tool call in the Hermes/Qwen syntax, reads the tool's answer and replies with it::

    user       964+494=?
    assistant  <tool_call>\\n{"name": "add", "arguments": {"a": 964, "b": 494}}\\n</tool_call>
    tool       1458
    assistant  1458

Steps:

1. records, a byte-level BPE tokenizer (built-in ChatML template) and a 2-layer model (hidden 64);
2. supervised warm-up, phase 1: solved conversations with the tool until greedy episodes on training prompts are
   right ``--solve-rate`` of the time (checked every 50 steps by a callback that stops the run; the step at which
   a tiny model learns to copy digits varies), phase 2: ``--mix-steps`` steps on a mixture where only
   ``--tool-fraction`` of the conversations use the tool and the others answer directly — the starting policy
   calls the tool sometimes and otherwise guesses;
3. for each seed and condition, ``GRPOTrainer`` with ``environment=`` a :class:`ToolEnvironment` — ``tool``: the
   calculator is registered; ``no_tool``: the same model with no tool (a call is answered with an error) — and the
   answer-correctness reward; before and after, on held-out problems (sampled episodes, temperature 1, the same
   random numbers): the mean reward and the rate of correct tool calls (first turn calls ``add`` with the operands).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from llm_trainer import GRPOConfig, GRPOTrainer, ModelConfig, OptimConfig, SFTConfig, SFTTrainer, TrainConfig
from llm_trainer.configs import EpisodeConfig
from llm_trainer.data import prepare_data
from llm_trainer.envs import EpisodeLimits, ToolEnvironment, calculator, play
from llm_trainer.generation import GenerateConfig
from llm_trainer.model import LlmModel
from llm_trainer.tokenizer import Tokenizer, train_tokenizer
from llm_trainer.trainers.callbacks import Callback

MAX_NEW_TOKENS = 40           # one turn: the tool call is ~33 tokens
LIMITS = EpisodeLimits(max_turns=3, max_tokens=160)


def environment(with_tool: bool):
    tools = [calculator.add] if with_tool else []
    return lambda: ToolEnvironment(tools, timeout_s=5.0)


def evaluate(model, tok, recs, with_tool: bool, greedy: bool = False, seed: int = 1234) -> tuple[float, float]:
    """(mean answer reward, correct tool-call rate) of one episode per record."""
    config = GenerateConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, do_sample=not greedy)
    gen = torch.Generator().manual_seed(seed)
    eps = play(model, tok, environment(with_tool), recs, config, LIMITS, generator=gen)
    reward = calculator.answer_reward(completions=[e.final_text for e in eps], answers=[r["answer"] for r in recs])
    return sum(reward) / len(recs), calculator.correct_tool_call_rate([e.messages for e in eps], recs)


class StopWhenSolved(Callback):
    """Every ``every`` steps: greedy episodes with the tool on ``probe`` records; stop once ``rate`` are right."""

    def __init__(self, tok, probe, rate: float, every: int = 50):
        self.tok, self.probe, self.rate, self.every = tok, probe, rate, every
        self.history: list[tuple[int, float]] = []

    def on_step_end(self, trainer, control, stats):
        if trainer.global_step % self.every:
            return
        model = trainer.backend.unwrap(trainer.model)
        solved, _ = evaluate(model, self.tok, self.probe, with_tool=True, greedy=True)
        self.history.append((trainer.global_step, solved))
        print(f"warm-up step {trainer.global_step}: greedy solve rate {solved:.2f}", flush=True)
        control.should_stop = solved >= self.rate


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft(out: Path, name: str, tok_dir: str, convs, init: str | None, model_config, steps: int, seed: int,
        callbacks=()) -> str:
    data = write_jsonl(out / "data" / f"{name}.jsonl", ({"messages": c} for c in convs))
    prepare_data("sft", Tokenizer(tok_dir), data, out / "data" / f"{name}_tokens", progress=False)
    cfg = TrainConfig(model_config=None if init else model_config, init_weights_path=init, tokenizer=tok_dir,
                      file_dataset=str(out / "data" / f"{name}_tokens"), batch_size=16, n_epochs=1000,
                      max_steps=steps, output_dir=str(out / name), save_interval=None, eval_interval=None,
                      log_interval=100, seed=seed, dtype="fp32", overwrite_output_dir=True,
                      optim_config=OptimConfig(initial_lr=3e-3, enable_lr_scheduler=False, weight_decay=0.0),
                      sft_config=SFTConfig(mask_prompt=True))
    SFTTrainer(train_config=cfg, callbacks=list(callbacks)).train()
    return str(out / name / "final")


def warm_up(out: Path, args) -> tuple[str, str, list[tuple[int, float]]]:
    """Tokenizer and the two warm-up phases; returns (tokenizer folder, warm model folder, phase-1 probe history)."""
    train = calculator.records(args.train_size, args.digits, seed=0)
    corpus = out / "data" / "corpus.txt"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_text(calculator.chatml_corpus(train))
    tok_dir = str(out / "tokenizer")
    tok = train_tokenizer([corpus], vocab_size=400, output_dir=tok_dir, show_progress=False)
    model_config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=192, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
    probe = StopWhenSolved(tok, train[:32], args.solve_rate)
    tool_sft = sft(out, "warmup_tool", tok_dir, [calculator.demonstration(r) for r in train], None, model_config,
                   args.warmup_max_steps, 0, [probe])
    mixed = calculator.warmup_conversations(train, args.tool_fraction, seed=1)
    return tok_dir, sft(out, "warmup_mix", tok_dir, mixed, tool_sft, None, args.mix_steps, 0), probe.history


def rl(out: Path, tok_dir: str, init: str, args, with_tool: bool, seed: int) -> GRPOTrainer:
    cfg = TrainConfig(init_weights_path=init, tokenizer=tok_dir, file_dataset=calculator.records(400, args.digits, 0),
                      batch_size=args.batch_size, n_epochs=1000, max_steps=args.steps, seed=seed, dtype="fp32",
                      output_dir=str(out / f"grpo_{'tool' if with_tool else 'no_tool'}_{seed}"), save_interval=None,
                      eval_interval=None, log_interval=5, overwrite_output_dir=True,
                      optim_config=OptimConfig(initial_lr=args.lr, enable_lr_scheduler=False, weight_decay=0.0),
                      grpo_config=GRPOConfig(group_size=args.group_size, loss_beta=0.0,
                                             episode_config=EpisodeConfig(max_turns=LIMITS.max_turns,
                                                                          max_episode_tokens=LIMITS.max_tokens),
                                             generate_config=GenerateConfig(max_new_tokens=MAX_NEW_TOKENS,
                                                                            temperature=1.0)))
    return GRPOTrainer(train_config=cfg, reward_func=calculator.answer_reward, environment=environment(with_tool))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/agentic_grpo")
    ap.add_argument("--digits", type=int, default=3, help="digits of each operand")
    ap.add_argument("--train-size", type=int, default=400)
    ap.add_argument("--test-size", type=int, default=64)
    ap.add_argument("--solve-rate", type=float, default=0.9, help="phase 1 stops at this greedy solve rate")
    ap.add_argument("--warmup-max-steps", type=int, default=1200)
    ap.add_argument("--mix-steps", type=int, default=100)
    ap.add_argument("--tool-fraction", type=float, default=0.3, help="share of tool use in the phase-2 mixture")
    ap.add_argument("--steps", type=int, default=12, help="GRPO steps per run")
    ap.add_argument("--batch-size", type=int, default=4, help="prompts per rollout")
    ap.add_argument("--group-size", type=int, default=8, help="episodes per prompt")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--conditions", nargs="+", default=["tool", "no_tool"], choices=["tool", "no_tool"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    tok_dir, warm, history = warm_up(out, args)
    tok = Tokenizer(tok_dir)
    test = calculator.records(args.test_size, args.digits, seed=99)
    results: dict = {"warmup": history}
    for cond in args.conditions:
        with_tool = cond == "tool"
        base = evaluate(LlmModel.from_pretrained(warm).eval(), tok, test, with_tool)
        for seed in args.seeds:
            tr = rl(out, tok_dir, warm, args, with_tool, seed)
            tr.train()
            after = evaluate(tr.backend.unwrap(tr.model), tok, test, with_tool)
            results[f"{cond}/{seed}"] = {"before": base, "after": after}
            print(f"[{cond} seed {seed}] reward {base[0]:.3f} -> {after[0]:.3f}; correct tool calls "
                  f"{base[1]:.3f} -> {after[1]:.3f}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
