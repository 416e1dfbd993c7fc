"""Loop overhead: our `Trainer` vs a minimal hand-written PyTorch loop, and our `SFTTrainer` vs trl's `SFTTrainer`.

    python scripts/bench/loop.py                                   # defaults below, a few minutes on 2 CPU cores
    python scripts/bench/loop.py --hidden 512 --layers 8 --seq 512 --batch 8 --steps 20 --rounds 3

Everything runs in this one process and the ratios printed are from this same run. The machine may be shared and
noisy, so the pretrain comparison interleaves the two loops step by step (after each of our optimizer steps the hand
loop does one), and the SFT comparison alternates which trainer runs first in each round; ``--rounds`` fresh
repetitions, the median is reported with every round's value.

* **pretrain**: `Trainer` (fp32, AdamW, clip 1.0, constant lr, no checkpoints/eval, ``log_interval`` 10) on a
  ``.npy`` token file with ``dataset_block_size = --seq`` vs a hand-written loop over the same windows: a torch
  DataLoader (shuffled), ``model(ids).logits``, mean token cross-entropy, ``backward``, ``clip_grad_norm_``,
  ``AdamW.step``, ``zero_grad``. Same `LlmModel`, same initial weights, same batch.
* **sft**: `SFTTrainer` vs ``trl.SFTTrainer`` on a tiny Qwen2 (our `LlmModel(architecture='qwen2')`, saved in HF
  format; trl trains ``transformers.Qwen2ForCausalLM`` loaded from that folder, ours loads it by
  ``init_weights_path``). Pre-tokenised sequences of --seq-7 … --seq tokens, loss on every token (trl's default
  for a language-modelling dataset; ours ``mask_prompt=False``), both pad to the longest row of the batch, fp32,
  AdamW (weight decay 0), lr 1e-4 constant, clip 1.0, no gradient checkpointing, same batch size.

Step time = median over the timed steps (after ``--warmup``) of the wall time of one optimizer step *including*
fetching and collating its data and the loop's own bookkeeping (logging, metrics): ours = from the end of the
previous step (of the interleaved hand step, for pretraining) to the end of our ``train_step`` inside
``Trainer.train()``; the hand loop = its fetch + forward/backward/clip/step/zero_grad; trl = the interval between
consecutive ``on_step_end`` callbacks; our SFT = the interval between consecutive ``train_step`` ends.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import now, step_intervals, word_tokenizer  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # our trainers pick the GPU when there is one


def intervals(ends: list[float], warmup: int) -> float:
    return statistics.median(step_intervals(ends, warmup))


def model_config(args, architecture: str):
    from llm_trainer.model import ModelConfig
    heads = max(args.hidden // 64, 2)
    return ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
                       max_position_embeddings=max(1024, args.seq), architecture=architecture,
                       attention_bias=architecture == "qwen2", tie_word_embeddings=False,
                       pad_token_id=0, eos_token_id=1)


# ------------------------------------------------------------------------------------------------------ pretrain
class HandLoop:
    """The minimal PyTorch loop, advanced one optimizer step at a time."""

    def __init__(self, args, work: str, seed: int) -> None:
        from llm_trainer.model import LlmModel
        torch.manual_seed(seed)
        tokens = np.load(os.path.join(work, "tokens.npy"), mmap_mode="r")
        seq = args.seq
        n = (len(tokens) - seq) // seq + 1

        class Windows(torch.utils.data.Dataset):
            def __len__(self):
                return n

            def __getitem__(self, i):
                return torch.from_numpy(tokens[i * seq:(i + 1) * seq].astype(np.int64))

        self.loader = torch.utils.data.DataLoader(Windows(), batch_size=args.batch, shuffle=True, drop_last=True)
        self.batches = iter(self.loader)
        self.model = LlmModel.from_pretrained(os.path.join(work, "llama")).to(DEVICE)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.0)

    def step(self) -> None:
        try:
            ids = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            ids = next(self.batches)
        ids = ids.to(DEVICE, non_blocking=True)
        logits = self.model(ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def run_pretrain_pair(args, work: str, round_: int) -> tuple[float, float]:
    """Our ``Trainer.train()`` and the hand loop interleaved step by step in one process: after each of our
    optimizer steps (inside ``train_step``) the hand loop does one step. Our step time = from the end of the hand
    step to the end of our next ``train_step`` (the rest of ``train()``'s loop body, fetching and collating the
    next window, the step); the hand step time = its own fetch + step. Interleaving makes background load hit
    both alike."""
    from llm_trainer import OptimConfig, Trainer, TrainConfig
    hand = HandLoop(args, work, round_)
    ours_t: list[float] = []
    hand_t: list[float] = []
    resume = [None]

    class Timed(Trainer):
        def train_step(self, window):
            out = super().train_step(window)
            t = now()
            if resume[0] is not None:
                ours_t.append(t - resume[0])
            hand.step()
            resume[0] = now()
            hand_t.append(resume[0] - t)
            return out

    cfg = TrainConfig(init_weights_path=os.path.join(work, "llama"), file_dataset=[os.path.join(work, "tokens.npy")],
                      dataset_block_size=args.seq, batch_size=args.batch,
                      output_dir=os.path.join(work, f"ours{round_}"),
                      dtype="fp32", ds_config=None, max_steps=args.warmup + args.steps + 1, save_interval=None,
                      eval_interval=None, log_interval=10, max_grad_norm=1.0, seed=round_,
                      optim_config=OptimConfig(initial_lr=1e-4, enable_lr_scheduler=False, weight_decay=0.0))
    Timed(train_config=cfg).train()
    w = args.warmup
    return statistics.median(ours_t[w:]), statistics.median(hand_t[w + 1:])


# ----------------------------------------------------------------------------------------------------------- sft
def sft_rows(args) -> list[list[int]]:
    rng = np.random.default_rng(0)
    count = args.batch * (args.warmup + args.steps + 2)
    return [rng.integers(2, args.vocab, args.seq - (i % 8)).tolist() for i in range(count)]


def run_ours_sft(args, work: str, round_: int) -> float:
    from llm_trainer import OptimConfig, SFTConfig, SFTTrainer, TrainConfig
    ends: list[float] = []

    class Timed(SFTTrainer):
        def train_step(self, window):
            out = super().train_step(window)
            ends.append(now())
            return out

    cfg = TrainConfig(init_weights_path=os.path.join(work, "qwen2"), file_dataset=[os.path.join(work, "sft")],
                      dataset_block_size=args.seq, batch_size=args.batch, output_dir=os.path.join(work, f"sft{round_}"),
                      dtype="fp32", ds_config=None, max_steps=args.warmup + args.steps, save_interval=None,
                      eval_interval=None, log_interval=10, max_grad_norm=1.0, seed=round_,
                      optim_config=OptimConfig(initial_lr=1e-4, enable_lr_scheduler=False, weight_decay=0.0),
                      sft_config=SFTConfig(mask_prompt=False))
    Timed(train_config=cfg).train()
    return intervals(ends, args.warmup)


def run_trl_sft(args, work: str, round_: int) -> float:
    from datasets import Dataset
    from transformers import Qwen2ForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer
    ends: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            ends.append(now())

    data = Dataset.from_dict({"input_ids": sft_rows(args)})
    model = Qwen2ForCausalLM.from_pretrained(os.path.join(work, "qwen2"), dtype=torch.float32)
    targs = SFTConfig(output_dir=os.path.join(work, f"trl{round_}"), per_device_train_batch_size=args.batch,
                      max_steps=args.warmup + args.steps, learning_rate=1e-4, lr_scheduler_type="constant",
                      weight_decay=0.0, max_grad_norm=1.0, report_to="none", use_cpu=DEVICE == "cpu", bf16=False,
                      fp16=False,
                      max_length=args.seq, save_strategy="no", logging_steps=10,
                      dataloader_num_workers=0, disable_tqdm=True, seed=round_, packing=False)
    SFTTrainer(model=model, args=targs, train_dataset=data, processing_class=word_tokenizer(args.vocab),
               callbacks=[Timer()]).train()
    return intervals(ends, args.warmup)


# ---------------------------------------------------------------------------------------------------------- main
def prepare(args, work: str) -> None:
    from llm_trainer.data.formats import IndexedWriter
    from llm_trainer.model import LlmModel
    for name, arch in (("llama", "llama"), ("qwen2", "qwen2")):
        torch.manual_seed(0)
        LlmModel(model_config(args, arch)).save_pretrained(os.path.join(work, name))
    rng = np.random.default_rng(1)
    need = args.seq * args.batch * (args.warmup + args.steps + 4)
    np.save(os.path.join(work, "tokens.npy"), rng.integers(2, args.vocab, need).astype(np.uint16))
    with IndexedWriter(os.path.join(work, "sft"), stage="sft", vocab_size=args.vocab) as w:
        for ids in sft_rows(args):
            w.add_sft(np.array(ids), np.ones(len(ids), dtype=np.int64))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="steps before timing starts")
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs of each variant (median reported)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", choices=["pretrain", "sft"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="bench_loop_")
    prepare(args, work)
    rows = []
    if args.only in (None, "pretrain"):
        t_ours, t_ref = zip(*(run_pretrain_pair(args, work, r) for r in range(args.rounds)))
        rows.append(("pretrain", "Trainer", statistics.median(t_ours), "hand-written loop", statistics.median(t_ref),
                     t_ours, t_ref))
    if args.only in (None, "sft"):
        t_ours, t_ref = [], []
        for r in range(args.rounds):           # alternate the order so a load trend favours neither side
            first, second = (run_ours_sft, run_trl_sft) if r % 2 == 0 else (run_trl_sft, run_ours_sft)
            a, b = first(args, work, r), second(args, work, r)
            t_ours.append(a if first is run_ours_sft else b)
            t_ref.append(b if first is run_ours_sft else a)
        rows.append(("sft", "SFTTrainer", statistics.median(t_ours), "trl SFTTrainer", statistics.median(t_ref),
                     t_ours, t_ref))

    tokens = args.batch * args.seq
    print(f"\nloop benchmark: H={args.hidden} L={args.layers} V={args.vocab}, batch {args.batch} x seq {args.seq} "
          f"({tokens} tokens/step), fp32 AdamW, {DEVICE}, {args.threads} CPU thread(s), torch {torch.__version__}, "
          f"median of {args.steps} steps, {args.rounds} rounds")
    print(f"{'task':<9}{'ours':<14}{'step s':>9}  {'reference':<18}{'step s':>9}{'ours/ref':>10}"
          "   per-round ours | ref")
    for task, on, to, rn, tr, all_o, all_r in rows:
        print(f"{task:<9}{on:<14}{to:>9.4f}  {rn:<18}{tr:>9.4f}{to / tr:>10.3f}   "
              f"{' '.join(f'{x:.4f}' for x in all_o)} | {' '.join(f'{x:.4f}' for x in all_r)}")


if __name__ == "__main__":
    main()
