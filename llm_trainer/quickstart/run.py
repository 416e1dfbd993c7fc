"""The quickstart pipeline: data → tokenizer → pretrain → SFT → DPO → GRPO, with held-out accuracy after each stage, then a
classifier (is ``a+b=c`` true?) on the SFT model with its held-out accuracy before and after training.

Everything is generated locally (no hub access); the full size takes a few minutes on a 2-core CPU, ``size="tiny"``
is the test-suite setting (seconds, no accuracy claims).

Every stage trains with a constant lr (on these budgets a warmup + cosine decay to lr/10 arrives before the model
has learned to add and left SFT far lower). SFT's held-out accuracy depends on where its learning transition falls,
which moves with the CPU's kernels, the thread count and the seed; the ranges measured over those are in
docs/benchmarks.md ("Quickstart").
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .evaluate import accuracy, load_test_set, sampled_reward
from .task import correct, write_classify_files, write_task_files


@dataclass(frozen=True)
class QuickstartSize:
    """A quickstart preset: the model, the task and each stage's budget (optimizer updates) and lr."""

    hidden: int
    """Model width."""
    layers: int
    """Transformer blocks."""
    heads: int
    """Attention heads (half as many KV heads)."""
    max_operand: int
    """Operands run over 0..max_operand."""
    pretrain_repeats: int
    """How often each training problem appears in the pretraining text."""
    pretrain_steps: int
    """Pretraining updates (2048 tokens each at batch 32)."""
    pretrain_lr: float
    """Pretraining lr."""
    sft_steps: int
    """SFT updates."""
    sft_lr: float
    """SFT lr."""
    dpo_steps: int
    """DPO updates."""
    dpo_lr: float
    """DPO lr."""
    grpo_steps: int
    """GRPO updates (batch_size // 4 prompts x 8 completions each)."""
    grpo_lr: float
    """GRPO lr."""
    batch_size: int
    """Sequences (pretrain, SFT) or pairs (DPO) per update."""
    test_limit: int
    """Held-out problems scored after each stage."""


SIZES = {
    "full": QuickstartSize(hidden=128, layers=4, heads=4, max_operand=49, pretrain_repeats=2, pretrain_steps=150,
                           pretrain_lr=1e-3, sft_steps=1000, sft_lr=1e-3, dpo_steps=40, dpo_lr=2e-5, grpo_steps=200,
                           grpo_lr=1e-4, batch_size=32, test_limit=250),
    "tiny": QuickstartSize(hidden=32, layers=2, heads=2, max_operand=9, pretrain_repeats=1, pretrain_steps=2,
                           pretrain_lr=1e-3, sft_steps=3, sft_lr=1e-3, dpo_steps=2, dpo_lr=2e-5, grpo_steps=2,
                           grpo_lr=2e-5, batch_size=8, test_limit=10),
}
STAGES = ("pretrain", "sft", "dpo", "grpo", "classify")
CLASSIFY_STEPS = {"full": 40, "tiny": 2}   # the classifier stage's optimizer steps per size


def _train_config(out: Path, stage: str, tokenizer_dir: Path, size: QuickstartSize, init: Path | None, *,
                  vocab_size: int, lr: float, steps: int, seed: int, batch_size: int | None = None, **kw):
    """A stage's TrainConfig: a new model when there is no ``init`` export to continue from; ``steps`` updates at a
    constant ``lr``."""
    from ..configs import OptimConfig, TrainConfig
    from ..model import ModelConfig
    model = None if init else ModelConfig(
        vocab_size=vocab_size, hidden_size=size.hidden, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, num_key_value_heads=max(1, size.heads // 2), max_position_embeddings=256,
        tie_word_embeddings=True)
    return TrainConfig(
        output_dir=str(out / stage), tokenizer=str(tokenizer_dir), init_weights_path=str(init) if init else None,
        model_config=model, batch_size=batch_size or size.batch_size, dataset_block_size=64, seed=seed,
        n_epochs=1000, max_steps=steps, log_interval=5, save_interval=10_000, eval_interval=10_000,
        resume_from="auto",
        optim_config=OptimConfig(initial_lr=lr, weight_decay=0.01),
        **kw)


def run_quickstart(output_dir: str | Path = "runs/quickstart", size: str = "full", stages=STAGES,
                   seed: int = 0) -> dict[str, dict[str, float]]:
    """Run the pipeline and return ``{stage: {metric: value}}`` (also written to ``results.json``).

    A stage left out of ``stages`` whose export already exists under ``output_dir`` (an earlier run) is the
    starting point of the next stage, so ``stages=("dpo", "grpo")`` continues from an earlier run's SFT."""
    import torch

    from ..configs import DPOConfig, GRPOConfig, PretrainConfig, SFTConfig
    from ..data import prepare_data
    from ..generation import GenerateConfig
    from ..model import LlmModel
    from ..tokenizer import Tokenizer, train_tokenizer
    from ..trainers.dpo import DPOTrainer
    from ..trainers.grpo import GRPOTrainer
    from ..trainers.pretrain import Trainer
    from ..trainers.sft import SFTTrainer

    sz = SIZES[size]
    out = Path(output_dir)
    t_start = time.perf_counter()
    say = lambda msg: print(f"[quickstart {time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)  # noqa: E731
    say(f"torch {torch.__version__} on {_threads()}, {torch.backends.cpu.get_cpu_capability()} kernels "
        f"(OMP_NUM_THREADS sets the thread count)")

    files = write_task_files(out / "data", seed=seed, max_operand=sz.max_operand, pretrain_repeats=sz.pretrain_repeats)
    test = load_test_set(files["test"])[:sz.test_limit]
    say(f"synthetic a+b task written to {out / 'data'} ({len(test)} held-out problems)")
    tok_dir = out / "tokenizer"
    train_tokenizer([files["pretrain"], files["sft"]], vocab_size=384, output_dir=tok_dir,
                    template="chatml", show_progress=False)
    tok = Tokenizer(tok_dir)
    say(f"tokenizer trained: vocab {tok.vocab_size}")
    data = out / "data"
    for stage in ("pretrain", "sft", "dpo", "rl"):
        prepare_data(stage, tok, files[stage], data / f"{stage}_tokens", progress=False)
    say("data prepared (memory-mapped .npy)")

    results: dict[str, dict[str, float]] = {}
    init: Path | None = None                                # the last finished stage's export ...
    model = None                                            # ... and its model

    def config(stage: str, lr: float, steps: int, **kw):
        return _train_config(out, stage, tok_dir, sz, init, vocab_size=tok.vocab_size, lr=lr, steps=steps,
                             seed=seed, **kw)

    def record(stage: str, t_stage: float, res: dict) -> None:
        res["seconds"] = round(time.perf_counter() - t_stage, 1)
        results[stage] = res
        say(f"{stage} done in {res['seconds']:.0f}s → held-out "
            + ", ".join(f"{k} {v:.3f}" for k, v in res.items() if k != "seconds"))
        (out / "results.json").write_text(json.dumps(results, indent=2))

    def finish(stage: str, t_stage: float, extra: dict | None = None) -> None:
        nonlocal init, model
        init = out / stage / "final"
        model = LlmModel.from_pretrained(init)
        res = {"chat_accuracy": accuracy(model, tok, test, chat=True)}
        if stage == "pretrain":
            res["completion_accuracy"] = accuracy(model, tok, test, chat=False)
        record(stage, t_stage, {**res, **(extra or {})})

    for stage in STAGES:
        t_stage = time.perf_counter()
        if stage not in stages:
            if (out / stage / "final" / "config.json").is_file():
                init = out / stage / "final"
                model = LlmModel.from_pretrained(init)
            continue
        if stage == "pretrain":
            Trainer(train_config=config("pretrain", sz.pretrain_lr, sz.pretrain_steps,
                                        file_dataset=[str(data / "pretrain_tokens.npy")],
                                        pretrain_config=PretrainConfig()),
                    eval_prompts=["12+7="]).train()
            finish(stage, t_stage)
        elif stage == "sft":
            SFTTrainer(train_config=config("sft", sz.sft_lr, sz.sft_steps, file_dataset=[str(data / "sft_tokens")],
                                           sft_config=SFTConfig(mask_prompt=True)),
                       eval_prompts=["12+7=?"]).train()
            finish(stage, t_stage)
        elif stage == "dpo":
            trainer = DPOTrainer(train_config=config("dpo", sz.dpo_lr, sz.dpo_steps,
                                                     file_dataset=[str(data / "dpo_tokens")],
                                                     dpo_config=DPOConfig(loss_beta=0.1, nll_loss_coef=0.2)),
                                 eval_prompts=["12+7=?"])
            before = trainer.preference_accuracy()
            trainer.train()
            after = trainer.preference_accuracy()
            finish(stage, t_stage, {"preference_accuracy_before": before["rewards/accuracy"],
                                    "preference_accuracy_after": after["rewards/accuracy"]})
        elif stage == "grpo":
            gen = GenerateConfig(max_new_tokens=6, temperature=1.0)
            cfg = config("grpo", sz.grpo_lr, sz.grpo_steps, batch_size=max(2, sz.batch_size // 4),
                         file_dataset=[str(data / "rl_tokens")],
                         grpo_config=GRPOConfig(group_size=8, loss_beta=0.0, generate_config=gen))
            before = sampled_reward(model, tok, test) if model is not None else float("nan")  # nan: no model yet
            GRPOTrainer(train_config=cfg, reward_func=correct, eval_prompts=["12+7=?"]).train()
            after = sampled_reward(LlmModel.from_pretrained(out / "grpo" / "final"), tok, test)
            finish(stage, t_stage, {"sampled_reward_before": before, "sampled_reward_after": after})
        else:
            sft = out / "sft" / "final"
            record(stage, t_stage, _classify_stage(out, tok, size, sz, seed,
                                                   init=sft if (sft / "config.json").is_file() else init))
    _plots(out, [s for s in STAGES if s in results])
    say(f"finished in {time.perf_counter() - t_start:.0f}s on {_threads()}; results in {out / 'results.json'}")
    return results


def _classify_stage(out: Path, tok, size: str, sz: QuickstartSize, seed: int, init: Path | None) -> dict[str, float]:
    """A sequence classifier on the SFT model (else the last export, else a new model): is the statement ``a+b=c``
    true? Plain-text statements (the pretraining format), held-out ones on unseen operand pairs; the held-out accuracy
    and macro-F1 before and after training."""
    from ..configs import ClassifyConfig
    from ..data.classify import prepare_classify
    from ..trainers.classify import ClassificationTrainer
    files = write_classify_files(out / "data", seed=seed, max_operand=sz.max_operand)
    data = out / "data"
    prepare_classify(tok, files["classify"], data / "classify_tokens", progress=False)
    prepare_classify(tok, files["classify_test"], data / "classify_test_tokens", labels=data / "classify_tokens",
                     progress=False)
    # lr 1e-3, 40 steps from the SFT model: held-out accuracy 0.44-0.50 -> 0.54-0.70 (docs/benchmarks.md, "Quickstart")
    cfg = _train_config(out, "classify", out / "tokenizer", sz, init, vocab_size=tok.vocab_size, seed=seed, lr=1e-3,
                        steps=CLASSIFY_STEPS[size], file_dataset=str(data / "classify_tokens"),
                        eval_file_dataset=str(data / "classify_test_tokens"), classify_config=ClassifyConfig())
    trainer = ClassificationTrainer(train_config=cfg)
    before = trainer.classification_metrics()
    after = trainer.train()                  # ends with an evaluation of the held-out statements
    return {"heldout_accuracy_before": before["accuracy"], "heldout_accuracy_after": after["eval_accuracy"],
            "heldout_macro_f1_before": before["macro_f1"], "heldout_macro_f1_after": after["eval_macro_f1"]}


def _threads() -> str:
    import torch
    n = torch.get_num_threads()
    return f"{n} CPU thread{'s' if n != 1 else ''}"


def _plots(out: Path, stages: list[str]) -> None:
    """One PNG per stage (a panel per logged metric) next to its ``metrics.jsonl``."""
    from ..plots import plot_metrics
    from ..metrics import read_metrics
    for stage in stages:
        log = out / stage / "metrics.jsonl"
        if log.is_file():
            plot_metrics([(stage, read_metrics(log))], out / stage / "metrics.png")
