"""DPO step time and peak memory: llm_trainer's DPOTrainer vs trl's DPOTrainer, same model, data and batch.

    python scripts/bench/dpo.py                     # tiny Qwen2 (H=256, 4 layers, V=8192), 8 pairs x 96+64 tokens
    python scripts/bench/dpo.py --steps 8 --pairs 8 --hidden 512 --layers 8 --vocab 32000

Both trainers start from the same Qwen2 weights (built with transformers and saved; ours loads them through
``init_weights_path``) and see the same token ids: a word-level tokenizer maps word ``w<i>`` to id ``i + 2`` and trl
appends EOS to each response, so our items are ``prompt + response + [eos]`` with the prompt masked. Settings are
matched: fp32, AdamW (weight decay 0), lr 1e-5, clip 1.0, no gradient checkpointing, batch = ``--pairs`` pairs
(one forward of 2 x pairs sequences), no accumulation, reference = frozen copy of the initial policy (online), or
precomputed reference log-probs (``precompute_ref_log_probs`` in both).

Every variant runs in its own fresh subprocess (``MALLOC_MMAP_THRESHOLD_=131072`` so freed large tensors go back
to the OS) and reports:

* ``step_s``: median wall time of the steps after the first (data loading and the reference pass of each step
  included; trl's time is measured between ``on_step_end`` callbacks, ours around ``train_step``);
* ``peak_rss``: the process's resident high-water mark (``VmHWM``) at the end — setup, reference pass, training;
* ``train_peak``: the high-water mark during the timed steps only (``/proc/self/clear_refs`` reset after the first
  step, so it starts from the live RSS: weights, reference, optimizer state, plus the step's activations);
* ``after imports``: RSS once the libraries are imported (before any model exists), and ``peak-imports``: the peak
  above it — what the models, data and steps cost, without the libraries' own footprint (trl pulls in
  transformers, datasets and accelerate; ours imports torch and llm_trainer);
* on CUDA, ``cuda_peak``: ``torch.cuda.max_memory_allocated`` over the timed steps.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (WorkerError, as_words, emit_result, hwm_bytes, max_rss_bytes, now, reset_hwm,  # noqa: E402
                    rss_bytes, run_worker, word_tokenizer, worker_env)


def make_data(args):
    """Deterministic token ids (without EOS): prompts of --prompt-len, responses of about --response-len."""
    import random
    rng = random.Random(0)
    rows = []
    for i in range(args.pairs * (args.steps + 2)):
        p = [rng.randrange(2, args.vocab) for _ in range(args.prompt_len)]
        c = [rng.randrange(2, args.vocab) for _ in range(args.response_len - i % 5)]
        r = [rng.randrange(2, args.vocab) for _ in range(args.response_len - (i + 2) % 7)]
        rows.append((p, c, r))
    return rows


def make_model(args, path):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 64, 2),
                      num_key_value_heads=max(args.hidden // 128, 1), max_position_embeddings=1024,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    Qwen2ForCausalLM(cfg).float().save_pretrained(path)


# ---------------------------------------------------------------------------------------------------- workers
def run_ours(args, workdir, precompute):
    import torch

    from llm_trainer import DPOConfig, OptimConfig, TrainConfig
    from llm_trainer.trainers.dpo import DPOTrainer
    _IMPORT_RSS[0] = rss_bytes()
    items = []
    for p, c, r in make_data(args):
        ci, ri = torch.tensor(p + c + [1]), torch.tensor(p + r + [1])
        cl, rl = ci.clone(), ri.clone()
        cl[:len(p)] = -100
        rl[:len(p)] = -100
        items.append({"chosen_input_ids": ci, "chosen_labels": cl, "rejected_input_ids": ri, "rejected_labels": rl})
    cfg = TrainConfig(init_weights_path=os.path.join(workdir, "model"), file_dataset=items, batch_size=args.pairs,
                      output_dir=os.path.join(workdir, f"ours{int(precompute)}"), dtype="fp32", save_interval=None,
                      eval_interval=None, log_interval=10**6, max_steps=args.steps + 1, ds_config=None,
                      max_grad_norm=1.0, data_loader_config={"shuffle": False},
                      optim_config=OptimConfig(initial_lr=1e-5, enable_lr_scheduler=False, weight_decay=0.0),
                      dpo_config=DPOConfig(loss_beta=0.1, precompute_ref_log_probs=precompute))
    tr = DPOTrainer(train_config=cfg)
    times = []
    for k, window in enumerate(tr.training_windows()):
        t = now()
        tr.train_step(window)
        times.append(now() - t)
        if k == 0:
            _after_first_step()
    return times


def run_trl(args, workdir, precompute):
    import torch
    from datasets import Dataset
    from transformers import Qwen2ForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    _IMPORT_RSS[0] = rss_bytes()
    rows = make_data(args)
    data = Dataset.from_dict({"prompt": [as_words(p) for p, _, _ in rows],
                              "chosen": [" " + as_words(c) for _, c, _ in rows],
                              "rejected": [" " + as_words(r) for _, _, r in rows]})
    model = Qwen2ForCausalLM.from_pretrained(os.path.join(workdir, "model"), dtype=torch.float32)
    times, last = [], [None]

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            last[0] = now()

        def on_step_end(self, a, state, control, **kw):
            times.append(now() - last[0])
            if len(times) == 1:
                _after_first_step()

    targs = DPOConfig(output_dir=os.path.join(workdir, f"trl{int(precompute)}"), per_device_train_batch_size=args.pairs,
                      max_steps=args.steps + 1, learning_rate=1e-5, lr_scheduler_type="constant", weight_decay=0.0,
                      max_grad_norm=1.0, beta=0.1, loss_type=["sigmoid"], report_to="none",
                      use_cpu=not _cuda(), bf16=False, fp16=False, max_length=None, save_strategy="no",
                      logging_steps=10**6, gradient_checkpointing=False, precompute_ref_log_probs=precompute,
                      dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = DPOTrainer(model=model, args=targs, train_dataset=data, processing_class=word_tokenizer(args.vocab),
                         callbacks=[Timer()])
    trainer.train()
    return times


_IMPORT_RSS = [0]


def _cuda():
    import torch
    return torch.cuda.is_available()


def _after_first_step() -> None:
    """The timed steps' peaks start here: VmHWM from the live RSS, the CUDA peak from the allocated memory."""
    import torch
    reset_hwm()
    if _cuda():
        torch.cuda.reset_peak_memory_stats()


def worker(args, which, precompute, workdir):
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    times = (run_ours if which == "ours" else run_trl)(args, workdir, precompute)
    out = {"step_s": statistics.median(times[1:]), "first_step_s": times[0], "steps": len(times),
           "train_peak": hwm_bytes(), "peak_rss": max_rss_bytes(), "import_rss": _IMPORT_RSS[0]}
    if _cuda():
        out["cuda_peak"] = torch.cuda.max_memory_allocated()
    emit_result(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=96)
    ap.add_argument("--response-len", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (one more warm-up step runs first)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", choices=["ours", "trl"], default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--_worker", nargs=3, metavar=("WHICH", "PRECOMPUTE", "WORKDIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        which, pre, workdir = args._worker
        return worker(args, which, pre == "1", workdir)

    workdir = tempfile.mkdtemp(prefix="bench_dpo_")
    make_model(args, os.path.join(workdir, "model"))
    env = worker_env(args.threads)
    passthrough = [f"--pairs={args.pairs}", f"--prompt-len={args.prompt_len}", f"--response-len={args.response_len}",
                   f"--hidden={args.hidden}", f"--layers={args.layers}", f"--vocab={args.vocab}",
                   f"--steps={args.steps}", f"--threads={args.threads}"]
    results = {}
    for pre in (False, True):
        for which in ("ours", "trl"):
            if args.only and which != args.only:
                continue
            name = f"{which}{'+precompute' if pre else ''}"
            try:
                results[name] = run_worker([sys.executable, __file__, *passthrough, "--_worker", which, str(int(pre)),
                                            workdir], env=env)
            except WorkerError as e:
                print(f"{name}: FAILED {e}", file=sys.stderr)
    mib = 1 << 20
    print(f"DPO step: {args.pairs} pairs, prompt {args.prompt_len} + response <= {args.response_len} + eos tokens, "
          f"Qwen2 H={args.hidden} L={args.layers} V={args.vocab}, fp32, {args.threads} thread(s), "
          f"median of {args.steps} steps")
    print(f"{'variant':<20}{'step s':>9}{'peak RSS MiB':>14}{'train peak MiB':>16}{'after imports':>15}"
          f"{'peak-imports':>14}" +
          (f"{'cuda peak MiB':>15}" if any('cuda_peak' in r for r in results.values()) else ""))
    for name, r in results.items():
        cuda = f"{r['cuda_peak'] / mib:>15.1f}" if "cuda_peak" in r else ""
        print(f"{name:<20}{r['step_s']:>9.3f}{r['peak_rss'] / mib:>14.1f}{r['train_peak'] / mib:>16.1f}"
              f"{r['import_rss'] / mib:>15.1f}{(r['peak_rss'] - r['import_rss']) / mib:>14.1f}{cuda}")
    for suffix in ("", "+precompute"):
        a, b = results.get("ours" + suffix), results.get("trl" + suffix)
        if a and b:
            extra = f", cuda peak {a['cuda_peak'] / b['cuda_peak']:.2f}x" if "cuda_peak" in a else ""
            print(f"ours/trl{suffix or ' (online reference)'}: step time {a['step_s'] / b['step_s']:.2f}x, "
                  f"peak RSS {a['peak_rss'] / b['peak_rss']:.2f}x, "
                  f"train peak {a['train_peak'] / b['train_peak']:.2f}x, "
                  f"peak above imports {(a['peak_rss'] - a['import_rss']) / (b['peak_rss'] - b['import_rss']):.2f}x"
                  f"{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
