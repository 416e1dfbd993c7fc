"""Pretraining throughput and model FLOPs utilisation (MFU) of our model and loss, bf16 autocast.

    python scripts/bench/mfu.py --size 125M --seq 2048                     # on a GPU: tight loop, eager
    python scripts/bench/mfu.py --size 350M --seq 2048 --compile           # torch.compile(model)
    python scripts/bench/mfu.py --size 125M --seq 2048 --mode trainer      # our Trainer on a token file
    python scripts/bench/mfu.py --size tiny --seq 128 --steps 3            # CPU smoke run

``--mode loop`` (default): a tight loop over ``LlmModel`` (random init, ``common.SHAPES``) with the loss the trainers
use (final hidden states → ``chunked_lm_loss``, 4096 tokens per chunk, no full logits), backward, clip 1.0 and our
``build_optimizer`` (``torch.optim.AdamW``, fused on CUDA); random token batches already on the device.
``--mode trainer``: our pretraining ``Trainer`` (``dtype="bf16"`` on CUDA) over a random uint16 token file, timed
between ``train_step`` ends (data loading and collation included).

Reported: tokens/s (median over the timed steps), model FLOPs per token (``LlmModel.flops_per_token``: 6·N +
attention, PaLM appendix B; N without the input embedding), MFU = FLOP/s over the GPU's dense bf16 peak
(``llm_trainer.metrics.estimate_mfu`` / ``peak_flops_for_device``; n/a on CPU), and the peak memory
(``torch.cuda.max_memory_allocated``; CPU: peak RSS). ``--json`` writes the result.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import SHAPES, cuda_peak_bytes, machine_line, max_rss_bytes, now, step_intervals  # noqa: E402

from llm_trainer.configs import OptimConfig  # noqa: E402
from llm_trainer.losses import chunked_lm_loss  # noqa: E402
from llm_trainer.metrics import estimate_mfu, peak_flops_for_device  # noqa: E402
from llm_trainer.model import LlmModel, ModelConfig  # noqa: E402
from llm_trainer.optim import build_optimizer  # noqa: E402


def model_config(args) -> ModelConfig:
    return ModelConfig(**{**SHAPES[args.size], "max_position_embeddings": max(args.seq, 128)})


def run_loop(args, device: torch.device) -> tuple[list[float], LlmModel]:
    torch.manual_seed(0)
    model = LlmModel(model_config(args)).to(device).train()
    opt = build_optimizer(model, OptimConfig(initial_lr=3e-4, enable_lr_scheduler=False))
    forward = torch.compile(model) if args.compile else model
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    g = torch.Generator(device="cpu").manual_seed(1)
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device) for _ in range(4)]
    ends = []
    for step in range(args.warmup + args.steps):
        ids = batches[step % len(batches)]
        with amp:
            hidden = forward(ids, return_hidden_states=True).hidden_states
            total, count = chunked_lm_loss(hidden, model.lm_head_weight(), ids, chunk_size=4096)
            loss = total / count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ends.append(now())
    return step_intervals(ends, args.warmup), model


def run_trainer(args, device: torch.device) -> tuple[list[float], LlmModel]:
    import numpy as np

    from llm_trainer import TrainConfig, Trainer
    from llm_trainer.configs import PretrainConfig
    work = tempfile.mkdtemp(prefix="bench_mfu_")
    cfg = model_config(args)
    n = args.batch * args.seq * (args.warmup + args.steps + 2)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, n)
    np.save(os.path.join(work, "tokens.npy"), tokens.astype(np.uint16))
    ends: list[float] = []

    class Timed(Trainer):
        def train_step(self, window):
            out = super().train_step(window)
            ends.append(now())
            return out

    tc = TrainConfig(model_config=cfg, file_dataset=[os.path.join(work, "tokens.npy")], dataset_block_size=args.seq,
                     batch_size=args.batch, output_dir=os.path.join(work, "out"), dtype=args.dtype, ds_config=None,
                     max_steps=args.warmup + args.steps, save_interval=None, eval_interval=None, log_interval=10**6,
                     max_grad_norm=1.0, pretrain_config=PretrainConfig(),
                     optim_config=OptimConfig(initial_lr=3e-4, enable_lr_scheduler=False))
    trainer = Timed(train_config=tc)
    for window in trainer.training_windows():     # the steps without the final export
        trainer.train_step(window)
    return step_intervals(ends, args.warmup), trainer.backend.unwrap(trainer.model)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=list(SHAPES), default="125M")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=None, help="rows per step (default: 32768 tokens per step)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator)")
    ap.add_argument("--mode", choices=["loop", "trainer"], default="loop")
    ap.add_argument("--compile", action="store_true", help="loop mode: torch.compile the model")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.batch = args.batch or max(1, 32768 // args.seq)
    if args.compile and args.mode != "loop":
        ap.error("--compile applies to --mode loop")
    torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    times, model = (run_loop if args.mode == "loop" else run_trainer)(args, device)
    step = statistics.median(times)
    tokens_per_s = args.batch * args.seq / step
    flops_per_token = model.flops_per_token(args.seq)
    peak_flops = peak_flops_for_device(device)
    mfu = estimate_mfu(flops_per_token, tokens_per_s, peak_flops)
    res = dict(size=args.size, params=model.num_parameters(), seq=args.seq, batch=args.batch, mode=args.mode,
               compile=args.compile, dtype=args.dtype, device=torch.cuda.get_device_name() if cuda else "cpu",
               step_s=times, tokens_per_s=tokens_per_s, flops_per_token=flops_per_token, peak_flops=peak_flops,
               mfu=mfu, peak_memory=cuda_peak_bytes() if cuda else max_rss_bytes())
    print(machine_line())
    print(f"{args.size} ({res['params'] / 1e6:.3g}M) seq {args.seq} batch {args.batch} {args.dtype} {args.mode}"
          f"{' compiled' if args.compile else ''}: step {step * 1000:.1f} ms (range {min(times) * 1000:.1f}-"
          f"{max(times) * 1000:.1f}), {tokens_per_s:,.0f} tokens/s, {flops_per_token / 1e9:.2f} GFLOP/token, "
          f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f} %'}, peak memory {res['peak_memory'] / 2**30:.2f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
