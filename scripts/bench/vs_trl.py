"""One measured training run, ours or trl's, of one task at one point (model folder, sequence length, batch).

    python scripts/bench/vs_trl.py --side ours --task sft --model DIR --seq 512 [--batch 1] [--steps 2] [--warmup 1]
                                   [--gc] [--dtype fp32|bf16] [--threads 1] [--work DIR]

Run by ``scale.py`` (and ``gpu.sh``) in a fresh subprocess per measurement; prints one ``RESULT {json}`` line. Both
sides load the same HF folder, train in the same precision (fp32, or bf16 autocast over fp32 weights: our
``dtype="bf16"``, trl's ``bf16=True``) with ``torch.optim.AdamW`` (lr 1e-5 constant, weight decay 0, clip 1.0), the
same batch and the same token ids; gradient checkpointing (``--gc``) is non-reentrant on both.

Tasks (``--batch`` B):

* ``sft``: B rows of ``--seq`` random tokens, loss on every token; ours ``SFTTrainer(mask_prompt=False)``, trl
  ``SFTTrainer`` on the pre-tokenised ``input_ids``.
* ``sft_lora``: the same with LoRA r=16, alpha=32 on the 7 projections (``LoRAConfig`` / ``peft.LoraConfig``).
* ``sft_packed``: documents of ``seq/16``–``seq/2`` tokens packed into rows of ``--seq`` (ours: ``packing=True``,
  ``SFTConfig.packing``: the batch's documents placed first-fit-decreasing; trl: ``packing=True``, best-fit
  decreasing over the dataset, padding-free); B·seq tokens per step on average. Report tokens/s.
* ``dpo``: B pairs, prompt ``seq/2`` tokens, responses ``seq/2 - 1`` tokens + EOS (each sequence ``--seq``), sigmoid
  loss, β 0.1, a frozen copy of the model as reference (words of ``common.word_tokenizer`` on trl's side).
* ``grpo``: one iteration on B prompts of ``seq - 16`` tokens × group 2, 16 sampled tokens each (EOS suppressed:
  fixed length), temperature 1, β 0 (no reference: trl's default), one optimizer step per rollout.

Measured: ``step_s`` (the wall time between the ends of consecutive optimizer steps, after ``--warmup`` steps: data,
generation and bookkeeping included; ours drives ``training_windows``/``train_step``, trl is timed by ``on_step_end``
callbacks), ``step_cpu_s`` (the same in process CPU time), ``peak_rss`` (``ru_maxrss``: loading + training),
``import_rss`` (RSS after the imports, before any model), ``train_hwm`` (``VmHWM`` over the timed steps only), on
CUDA ``cuda_peak`` (``max_memory_allocated``, whole run), and ``tokens_per_step`` (non-padding token ids entering the
trained model's forward, counted by a hook; not for GRPO).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (as_words, cpu_seconds, cuda_peak_bytes, emit_result, max_rss_bytes, now,  # noqa: E402
                    reset_hwm, hwm_bytes, rss_bytes, step_intervals, word_tokenizer)

TASKS = ("sft", "sft_lora", "sft_packed", "dpo", "grpo")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R, LORA_ALPHA = 16, 32
GRPO_GROUP, GRPO_NEW_TOKENS = 2, 16
LR = 1e-5


# -------------------------------------------------------------------------------------------------------- data
def vocab_size(model_dir: str) -> int:
    import json
    return json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]


def data_range(model_dir: str) -> tuple[int, int]:
    """Token ids the data is drawn from: 2 .. min(vocab, 151643) (0 = padding, 1 = EOS; Qwen's specials above)."""
    return 2, min(vocab_size(model_dir), 151643)


def rows(args, n: int, length: int | tuple[int, int], seed: int = 0) -> list[list[int]]:
    """``n`` random token rows of ``length`` tokens (or lengths drawn from the ``(lo, hi)`` range)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    lo, hi = data_range(args.model)
    lens = [length] * n if isinstance(length, int) else rng.integers(length[0], length[1] + 1, n).tolist()
    return [rng.integers(lo, hi, k).tolist() for k in lens]


def total_steps(args) -> int:
    return args.warmup + args.steps


def sft_rows(args) -> list[list[int]]:
    if args.task == "sft_packed":
        lo, hi = max(args.seq // 16, 2), max(args.seq // 2, 3)
        docs = round(args.batch * args.seq / ((lo + hi) / 2))       # ≈ batch rows of seq tokens per step
        return rows(args, docs * (total_steps(args) + 2), (lo, hi))
    return rows(args, args.batch * (total_steps(args) + 1), args.seq)


def sft_docs_per_step(args) -> int:
    lo, hi = max(args.seq // 16, 2), max(args.seq // 2, 3)
    return round(args.batch * args.seq / ((lo + hi) / 2)) if args.task == "sft_packed" else args.batch


def dpo_rows(args) -> list[tuple[list[int], list[int], list[int]]]:
    n = args.batch * (total_steps(args) + 1)
    half = args.seq // 2
    p, c, r = rows(args, n, half, 1), rows(args, n, half - 1, 2), rows(args, n, half - 1, 3)
    return list(zip(p, c, r))


def grpo_prompts(args) -> list[list[int]]:
    return rows(args, args.batch * (total_steps(args) + 1), args.seq - GRPO_NEW_TOKENS, 4)


def grpo_reward(completions) -> list[float]:
    """A deterministic reward with spread inside every group (the sum of the ids modulo 7)."""
    return [float(sum(c) % 7) for c in completions]


# ------------------------------------------------------------------------------------------------ token counter
class TokenCounter:
    """Counts the data token ids (not padding/EOS) entering a module's forward."""

    def __init__(self, module, id_range: tuple[int, int]) -> None:
        self.tokens = 0
        self.lo, self.hi = id_range
        module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and module.training:
            self.tokens += int(((ids >= self.lo) & (ids < self.hi)).sum())


# -------------------------------------------------------------------------------------------------------- ours
def run_ours(args) -> dict:
    import numpy as np

    from llm_trainer import LoRAConfig, OptimConfig, SFTConfig, TrainConfig
    from llm_trainer.model import ModelConfig
    out: dict = {"import_rss": rss_bytes()}
    # The folder brings the architecture; model_config only satisfies TrainConfig's check of dataset_block_size
    # against model_config.max_position_embeddings, which it makes even when init_weights_path is set (its default
    # ModelConfig allows 2048 positions).
    common = dict(init_weights_path=args.model, model_config=ModelConfig(max_position_embeddings=max(args.seq, 2048)),
                  batch_size=args.batch, output_dir=os.path.join(args.work, "ours"),
                  overwrite_output_dir=True, dtype=args.dtype, ds_config=None, max_steps=total_steps(args),
                  save_interval=None, eval_interval=None, log_interval=10**6, max_grad_norm=1.0, seed=0,
                  gradient_checkpointing=args.gc, data_loader_config={"shuffle": False},
                  optim_config=OptimConfig(initial_lr=LR, enable_lr_scheduler=False, weight_decay=0.0))
    if args.task.startswith("sft"):
        from llm_trainer import SFTTrainer
        from llm_trainer.data.formats import IndexedWriter
        data = os.path.join(args.work, f"sft_{args.task}_{args.seq}_{args.batch}_{total_steps(args)}_"
                                       f"{data_range(args.model)[1]}")
        if not os.path.isdir(data):
            with IndexedWriter(data, stage="sft", vocab_size=vocab_size(args.model)) as w:
                for ids in sft_rows(args):
                    w.add_sft(np.array(ids), np.ones(len(ids), dtype=np.int64))
        lora = LoRAConfig(r=LORA_R, alpha=LORA_ALPHA, target_modules=LORA_TARGETS) if args.task == "sft_lora" else None
        cfg = TrainConfig(file_dataset=[data], dataset_block_size=args.seq, lora=lora,
                          sft_config=SFTConfig(mask_prompt=False, packing=args.task == "sft_packed",
                                               **({"chunked_cross_entropy_size": args.ce_chunk} if args.ce_chunk
                                                  else {})),
                          **{**common, "batch_size": sft_docs_per_step(args)})
        tr = SFTTrainer(train_config=cfg)
    elif args.task == "dpo":
        import torch

        from llm_trainer import DPOConfig
        from llm_trainer.trainers.dpo import DPOTrainer
        items = []
        for p, c, r in dpo_rows(args):
            ci, ri = torch.tensor(p + c + [1]), torch.tensor(p + r + [1])
            cl, rl = ci.clone(), ri.clone()
            cl[:len(p)] = -100
            rl[:len(p)] = -100
            items.append({"chosen_input_ids": ci, "chosen_labels": cl, "rejected_input_ids": ri,
                          "rejected_labels": rl})
        cfg = TrainConfig(file_dataset=items, dataset_block_size=args.seq,
                          dpo_config=DPOConfig(loss_beta=0.1), **common)
        tr = DPOTrainer(train_config=cfg)
    else:
        import torch

        from llm_trainer.configs import GRPOConfig
        from llm_trainer.generation import GenerateConfig
        from llm_trainer.trainers.grpo import GRPOTrainer
        items = [{"prompt_ids": torch.tensor(p)} for p in grpo_prompts(args)]
        gen = GenerateConfig(max_new_tokens=GRPO_NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0,
                             stop_token_ids=None)
        cfg = TrainConfig(file_dataset=items, grpo_config=GRPOConfig(
            group_size=GRPO_GROUP, loss_beta=0.0, grpo_batch_size=GRPO_GROUP * args.batch, generate_config=gen),
            **common)
        tr = GRPOTrainer(train_config=cfg, reward_func=lambda completion_ids: grpo_reward(completion_ids))
        tr.engine.eos_token_ids = []                     # fixed-length completions, as trl's min_new_tokens
    counter = TokenCounter(tr.model, data_range(args.model)) if args.task != "grpo" else None
    ends, cpu_ends = [], []
    for window in tr.training_windows():
        tr.train_step(window)
        ends.append(now())
        cpu_ends.append(cpu_seconds())
        if len(ends) == args.warmup:
            reset_hwm()
            tokens0 = counter.tokens if counter else 0
    out.update(step_s=step_intervals(ends, args.warmup), step_cpu_s=step_intervals(cpu_ends, args.warmup),
               steps=len(ends))
    if counter:
        out["tokens_per_step"] = (counter.tokens - tokens0) / max(len(ends) - args.warmup, 1)
    return out


# --------------------------------------------------------------------------------------------------------- trl
def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    out: dict = {"import_rss": rss_bytes()}
    cuda = torch.cuda.is_available()
    ends, cpu_ends, marks = [], [], {}
    counter: list = [None]

    class Timer(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            ends.append(now())
            cpu_ends.append(cpu_seconds())
            if len(ends) == args.warmup:
                reset_hwm()
                marks["tokens0"] = counter[0].tokens if counter[0] else 0

    common = dict(output_dir=os.path.join(args.work, "trl"), per_device_train_batch_size=args.batch,
                  max_steps=total_steps(args), learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
                  max_grad_norm=1.0, report_to="none", use_cpu=not cuda, bf16=args.dtype == "bf16", fp16=False,
                  save_strategy="no", logging_steps=10**6, dataloader_num_workers=0, disable_tqdm=True, seed=0,
                  optim="adamw_torch", gradient_checkpointing=args.gc,
                  gradient_checkpointing_kwargs={"use_reentrant": False} if args.gc else None)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = word_tokenizer(data_range(args.model)[1])
    if args.task.startswith("sft"):
        from trl import SFTConfig, SFTTrainer
        peft_config = None
        if args.task == "sft_lora":
            from peft import LoraConfig
            peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS, lora_dropout=0.0,
                                     task_type="CAUSAL_LM")
        targs = SFTConfig(max_length=args.seq, packing=args.task == "sft_packed", **common)
        trainer = SFTTrainer(model=model, args=targs, train_dataset=Dataset.from_dict({"input_ids": sft_rows(args)}),
                             processing_class=tok, callbacks=[Timer()], peft_config=peft_config)
    elif args.task == "dpo":
        from trl import DPOConfig, DPOTrainer
        data = dpo_rows(args)
        ds = Dataset.from_dict({"prompt": [as_words(p) for p, _, _ in data],
                                "chosen": [" " + as_words(c) for _, c, _ in data],
                                "rejected": [" " + as_words(r) for _, _, r in data]})
        targs = DPOConfig(beta=0.1, loss_type=["sigmoid"], max_length=None, **common)
        trainer = DPOTrainer(model=model, args=targs, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
    else:
        from trl import GRPOConfig, GRPOTrainer

        def reward(prompts, completions, completion_ids, **kw):
            return grpo_reward(completion_ids)

        ds = Dataset.from_dict({"prompt": [as_words(p) for p in grpo_prompts(args)]})
        targs = GRPOConfig(num_generations=GRPO_GROUP, max_completion_length=GRPO_NEW_TOKENS, temperature=1.0,
                           top_p=1.0, top_k=0, beta=0.0, generation_kwargs={"min_new_tokens": GRPO_NEW_TOKENS},
                           shuffle_dataset=False, **{**common, "per_device_train_batch_size": GRPO_GROUP * args.batch})
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=targs, train_dataset=ds, processing_class=tok,
                              callbacks=[Timer()])
    if args.task != "grpo":
        counter[0] = TokenCounter(trainer.model, data_range(args.model))
    trainer.train()
    out.update(step_s=step_intervals(ends, args.warmup), step_cpu_s=step_intervals(cpu_ends, args.warmup),
               steps=len(ends))
    if counter[0]:
        out["tokens_per_step"] = (counter[0].tokens - marks.get("tokens0", 0)) / max(len(ends) - args.warmup, 1)
    return out


# --------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--side", choices=["ours", "trl"], required=True)
    ap.add_argument("--task", choices=TASKS, required=True)
    ap.add_argument("--model", required=True, help="HF-format model folder (common.write_model_folder)")
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1)")
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing on every block")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=None, help="scratch folder (default: beside --model)")
    ap.add_argument("--ce-chunk", type=int, default=None,
                    help="ours, SFT: SFTConfig.chunked_cross_entropy_size (default: the library's)")
    args = ap.parse_args(argv)
    if args.warmup < 1:
        ap.error("--warmup must be >= 1 (the first step's interval has no start)")
    args.work = args.work or str(Path(args.model).parent / "work")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    os.makedirs(args.work, exist_ok=True)
    res = run_ours(args) if args.side == "ours" else run_trl(args)
    res.update(peak_rss=max_rss_bytes(), train_hwm=hwm_bytes(), cuda_peak=cuda_peak_bytes(),
               threads=torch.get_num_threads())
    emit_result(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
