"""Benchmark: multi-turn rollouts and exact rollout log-probs, one run.

    python scripts/bench/agentic.py [--episodes 16] [--turns 4] [--turn-tokens 16] [--repeats 3] [--threads N]
                                    [--grpo-steps 4] [--skip-grpo]

Same random-init Llama-style model everywhere (hidden 384, 6 layers, 6 heads / 2 KV heads, vocab of a byte-level
BPE tokenizer trained here with the built-in ChatML template).

1. **Rollout tokens/s, multi-turn vs single-turn.** Both generate ``episodes x turns x turn-tokens`` tokens with the
   rollout engine (temperature 1, EOS ignored, fixed-length turns). Single-turn: one completion of
   ``turns x turn-tokens`` tokens per episode. Multi-turn: ``turns`` turns per episode played by
   ``llm_trainer.envs.run_episodes`` with a tool environment — each turn's reply is answered by a tool result
   (a real call through ``ToolRunner``, a calculator) appended as chat-template ids, and the next turn prefills the
   whole trajectory again. Tokens/s counts generated tokens only; median of ``--repeats``, the two interleaved.
2. **Log-prob gap** between the rollout engine's log-probs and the trainer's recomputation (``completion_logps`` on
   the same sequences): mean / max absolute difference and the k3 KL, with the default engine and with the exact
   mode (``old_logprobs="exact"``, batch-invariant numerics).
3. **GRPO step time, recompute vs exact**: ``--grpo-steps`` optimizer steps of ``GRPOTrainer`` (one rollout per
   step, 4 prompts x 8 samples, 32 new tokens), ``old_logprobs="recompute"`` (old-policy forward pass) vs
   ``"exact"`` (no old-policy forward; exact decoding and update numerics), runs alternated; per-phase times
   (rollout = generation, rewards, old-policy and reference forward passes; update = the optimizer steps).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llm_trainer.envs import EpisodeLimits, StepResult, Tool, ToolRunner, TurnEncoder, calculator  # noqa: E402
from llm_trainer.envs.episodes import Episode, run_episodes  # noqa: E402
from llm_trainer.generation import GenerateConfig  # noqa: E402
from llm_trainer.model import LlmModel, ModelConfig  # noqa: E402
from llm_trainer.parallel.base import head_projection  # noqa: E402
from llm_trainer.parallel.single import SingleBackend  # noqa: E402
from llm_trainer.tokenizer import train_tokenizer  # noqa: E402
from llm_trainer.trainers.exact import exact_generate, exact_numerics, exact_project  # noqa: E402
from llm_trainer.trainers.rollout import GenerationResult, RolloutEngine, build_sequences, completion_logps  # noqa: E402

ADD = Tool.from_function(calculator.add)


class CalculatorTurns:
    """Answers every reply with a calculator result (a real tool call) until ``turns`` replies were made."""

    def __init__(self, turns: int):
        self.turns, self.n = turns, 0

    def reset(self, record):
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, text):
        self.n += 1
        if self.n >= self.turns:
            return StepResult(None, 0.0, True)
        result = ToolRunner.shared([ADD]).run(ADD, {"a": 1000 + self.n, "b": len(text)})
        return StepResult([{"role": "tool", "content": result.output}], 0.0, False)


def setup(seed: int):
    folder = Path(tempfile.mkdtemp())
    (folder / "corpus.txt").write_text(calculator.chatml_corpus(calculator.records(300)))
    tok = train_tokenizer([folder / "corpus.txt"], vocab_size=512, output_dir=folder / "tok", show_progress=False)
    torch.manual_seed(seed)
    model = LlmModel(ModelConfig(vocab_size=tok.vocab_size, hidden_size=384, intermediate_size=1024,
                                 num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                                 max_position_embeddings=1024, initializer_range=0.05,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    model.save_pretrained(folder / "model")
    tok.save(folder / "model")
    return folder, tok, model


def rollout_throughput(tok, model, args) -> None:
    E, K, L = args.episodes, args.turns, args.turn_tokens
    backend = SingleBackend()
    encoder = TurnEncoder(tok)
    records = [{"prompt": f"{100 + i}+{200 + i}=?"} for i in range(E)]
    gen = torch.Generator().manual_seed(0)

    def engine(tokens: int) -> RolloutEngine:
        return RolloutEngine(backend, GenerateConfig(max_new_tokens=tokens, temperature=1.0), [], tok.pad_token_id)

    single_engine, turn_engine = engine(K * L), engine(L)
    prompts = [encoder.prompt_ids([{"role": "user", "content": r["prompt"]}]) for r in records]

    def single():
        return single_engine.generate(model, prompts, gen, gather=False)

    def multi():
        episodes = []
        for i, r in enumerate(records):
            env = CalculatorTurns(K)
            msgs = env.reset(r)
            episodes.append(Episode(i, r, env, None, msgs, encoder.prompt_ids(msgs)))

        def generate(contexts):          # fixed-length turns: every reply counts as ended by its stop token
            res = turn_engine.generate_contexts(model, contexts, gen)
            return GenerationResult(res.completions, res.logprobs, [True] * len(contexts))
        run_episodes(episodes, generate, encoder, tok.decode, EpisodeLimits(max_turns=K))
        assert all(len(e.turns) == K and sum(e.loss_mask) == K * L for e in episodes)
        return episodes

    times = {"single": [], "multi": []}
    single(), multi()                                    # warm-up
    for _ in range(args.repeats):                         # interleaved
        for name, fn in (("single", single), ("multi", multi)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    n = E * K * L
    print(f"rollout: {E} episodes, {n} generated tokens each way; multi-turn: {K} turns of {L} tokens with a "
          f"calculator call and its chat-template turn in between; single-turn: one completion of {K * L} tokens")
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    for name, ts in times.items():
        print(f"  {name:7s} {n / best[name]:7.1f} / {n / med[name]:7.1f} generated tok/s (best / median; repeats "
              f"{', '.join(f'{t * 1000:.0f}' for t in ts)} ms)")
    ratios = [s_ / m_ for s_, m_ in zip(times["single"], times["multi"])]
    print(f"  multi-turn / single-turn throughput per pair: {', '.join(f'{x:.2f}' for x in ratios)}; best-based "
          f"{best['single'] / best['multi']:.2f}")


def logprob_gap(tok, model, args) -> None:
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, tok.vocab_size, (n,), generator=g).tolist() for n in (24, 40, 31, 57) for _ in range(4)]
    config = GenerateConfig(max_new_tokens=32, temperature=1.0)
    engine = RolloutEngine(SingleBackend(), config, [], tok.pad_token_id)
    default = engine.generate(model, prompts, torch.Generator().manual_seed(2), gather=False)
    project = exact_project(head_projection(model))
    with exact_numerics(model):
        comps, lps, _ = exact_generate(model, prompts, config, [], tok.pad_token_id, project,
                                       torch.Generator().manual_seed(2))
    print("log-prob gap, rollout engine vs trainer recomputation (16 sequences x 32 tokens, micro-batches of 4):")
    for name, completions, logps, exact in (("default", default.completions, default.logprobs, False),
                                           ("exact", comps, lps, True)):
        diffs, kls = [], []
        for s in range(0, len(prompts), 4):
            b = build_sequences(prompts[s:s + 4][::-1], completions[s:s + 4][::-1], tok.pad_token_id)
            with torch.no_grad(), (exact_numerics(model) if exact else contextlib.nullcontext()):
                lp = completion_logps(model, b, 1.0, project=project if exact else None)["logp"]
            for r, i in enumerate(range(s + 3, s - 1, -1)):
                d = lp[r, :len(completions[i])] - logps[i]
                diffs.append(d.abs())
                kls.append(torch.expm1(d) - d)
        d, k = torch.cat(diffs), torch.cat(kls)
        print(f"  {name:8s} mean |diff| {float(d.mean()):.3e}   max |diff| {float(d.max()):.3e}   "
              f"KL(rollout || trainer) {float(k.mean()):.3e}")


def grpo_step_times(folder: Path, vocab: int, args) -> None:
    from llm_trainer.configs import GRPOConfig, OptimConfig, TrainConfig
    from llm_trainer.trainers.grpo import GRPOTrainer
    g = torch.Generator().manual_seed(3)
    items = [{"prompt_ids": torch.randint(3, vocab, (48,), generator=g)} for _ in range(4 * (args.grpo_steps + 1))]

    def reward(completion_ids):
        return [float(sum(c) % 7) for c in completion_ids]

    def run(mode: str) -> dict[str, float]:
        with tempfile.TemporaryDirectory() as out:
            cfg = TrainConfig(init_weights_path=str(folder / "model"), file_dataset=items, batch_size=4,
                              output_dir=out, optim_config=OptimConfig(initial_lr=1e-5), save_interval=None,
                              eval_interval=None, log_interval=10**6, max_steps=args.grpo_steps, dtype="fp32",
                              data_loader_config={"shuffle": False},
                              grpo_config=GRPOConfig(group_size=8, loss_beta=0.0, grpo_batch_size=8,
                                                     gradient_accumulation_steps=4,
                                                     generate_config=GenerateConfig(max_new_tokens=32)))
            tr = GRPOTrainer(train_config=cfg, reward_func=reward, old_logprobs=mode)
            tr.engine.eos_token_ids, tr.engine.stop_ids = [], set()       # fixed-length completions
            totals = {"rollout": 0.0, "update": 0.0, "generate": 0.0, "old_logp": 0.0}
            make, step = tr.make_rollout_batches, tr.train_step

            def timed_rollout(prompts):
                t0 = time.perf_counter()
                micro = make(prompts)
                totals["rollout"] += time.perf_counter() - t0
                for k in ("generate", "old_logp"):
                    totals[k] += tr.timer.times.get(k, 0.0)
                return micro

            def timed_step(window):
                t0 = time.perf_counter()
                out_ = step(window)
                totals["update"] += time.perf_counter() - t0
                return out_
            tr.make_rollout_batches, tr.train_step = timed_rollout, timed_step
            stats = tr.train()
            out = {k: v / args.grpo_steps for k, v in totals.items()}
            out["step"] = out["rollout"] + out["update"]
            out["gap_max"] = stats.get("logprob_gap/max", float("nan"))
            return out

    results: dict[str, list[dict[str, float]]] = {"recompute": [], "exact": []}
    run("recompute")                                                           # warm-up
    for _ in range(args.repeats):
        for mode in ("recompute", "exact"):
            results[mode].append(run(mode))
    print(f"GRPO step (4 prompts x 8 samples, 48-token prompts, 32 new tokens, 4 micro-batches), "
          f"{args.grpo_steps} steps per run, {args.repeats} alternated runs; ms per step, min / median over runs:")
    mins = {m: {k: min(r[k] for r in rs) for k in rs[0]} for m, rs in results.items()}
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in results.items()}
    for mode in results:
        cell = lambda k: f"{mins[mode][k] * 1000:5.0f} / {med[mode][k] * 1000:5.0f}"  # noqa: E731
        print(f"  {mode:9s} step {cell('step')}   generate {cell('generate')}   old-policy forward "
              f"{cell('old_logp')}   update {cell('update')}   logprob_gap/max {med[mode]['gap_max']:.1e}")
        runs = ", ".join(f"{r['step'] * 1000:.0f}" for r in results[mode])
        print(f"            per run: {runs}")
    ratios = [e["step"] / r["step"] for e, r in zip(results["exact"], results["recompute"])]
    print(f"  exact / recompute step time, per pair of runs: {', '.join(f'{x:.2f}' for x in ratios)}; "
          f"min-based {mins['exact']['step'] / mins['recompute']['step']:.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--turn-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--grpo-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-grpo", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder, tok, model = setup(args.seed)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, vocab {tok.vocab_size}")
    rollout_throughput(tok, model, args)
    logprob_gap(tok, model, args)
    if not args.skip_grpo:
        grpo_step_times(folder, tok.vocab_size, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
