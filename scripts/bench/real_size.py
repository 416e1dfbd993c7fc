"""A real-size LoRA run on CPU: a Qwen2.5-0.5B-shaped model (random weights, the real config: 24 layers, hidden 896,
GQA 14/2 heads, intermediate 4864, vocab 151,936, tied embeddings, qkv bias) — ours vs `transformers` + `peft`.

    python scripts/bench/real_size.py                          # seq 256, batch 1, 4 timed steps, 2 repeats
    python scripts/bench/real_size.py --seq 512 --batch 2 --steps 3 --repeats 3
    python scripts/bench/real_size.py --pair --steps 4          # the two models' steps alternating in one process

The HF folder (bf16 safetensors, ~1 GB) is written once with our `save_pretrained` into ``--dir``; ``transformers``
loads it too (the reference run does). Each measured run is its own subprocess, so its peak RSS
(``ru_maxrss``) is its own; the runs alternate ours/reference in each repeat so that background load hits both.

* **ours**: `SFTTrainer` (``init_weights_path`` = the folder, fp32, ``LoRAConfig(r, alpha, target_modules)``,
  ``gradient_checkpointing=True``, AdamW lr 1e-4 weight decay 0, clip 1.0, loss on every token,
  no checkpoints/eval), then `generate` (greedy, ``--new-tokens``) with the trained model, then the trainer's own
  export (``final/``, LoRA merged, written at the end of ``train()``).
* **reference**: ``AutoModelForCausalLM.from_pretrained(dtype=float32)``, ``gradient_checkpointing_enable``
  (``use_reentrant=False``, as ours), ``peft.get_peft_model(LoraConfig(same r/alpha/targets, dropout 0))``, the
  same rows and batch, ``loss = model(input_ids, labels=input_ids).loss``, backward, clip 1.0, ``torch.optim.AdamW``
  (same lr, weight decay 0), then ``generate`` (greedy), then ``merge_and_unload().save_pretrained``.

Step time = median over the timed steps after ``--warmup`` (ours: intervals between consecutive ``train_step``
ends; reference: one loop iteration), as wall time and as the process's CPU time (user + system, all threads;
steadier when other jobs share the cores). Every run's raw numbers are appended to ``--dir``/results.jsonl. Peak RSS is recorded after loading, after training, after generation and
after the export (the process peak so far, so each is ≥ the previous).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=True, architecture="qwen2",
                  bos_token_id=151643, eos_token_id=151643)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # KiB on Linux


def cpu_s() -> float:
    """User + system CPU seconds of this process (all threads): steadier than wall time on a shared machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rows(args) -> list[list[int]]:
    import numpy as np
    rng = np.random.default_rng(0)
    n = args.batch * (args.warmup + args.steps)
    return [rng.integers(0, 151643, args.seq).tolist() for _ in range(n)]


# ------------------------------------------------------------------------------------------------------- build
def build(args) -> None:
    import numpy as np
    import torch

    from llm_trainer.data.formats import IndexedWriter
    from llm_trainer.model import LlmModel, ModelConfig
    folder = os.path.join(args.dir, "model")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        torch.manual_seed(0)
        with torch.device("meta"):
            model = LlmModel(ModelConfig(**QWEN25_05B))
        model = model.to_empty(device="cpu").to(torch.bfloat16)
        model.init_weights()
        model.save_pretrained(folder)
        print(f"wrote {folder}: {model.num_parameters() / 1e6:.1f}M parameters", flush=True)
    data = os.path.join(args.dir, f"sft_{args.seq}_{args.batch}_{args.warmup + args.steps}")
    if not os.path.isdir(data):
        with IndexedWriter(data, stage="sft", vocab_size=QWEN25_05B["vocab_size"]) as w:
            for ids in rows(args):
                w.add_sft(np.array(ids), np.ones(len(ids), dtype=np.int64))


# ---------------------------------------------------------------------------------------------------- the runs
def run_ours(args) -> dict:
    import torch

    from llm_trainer import LoRAConfig, OptimConfig, SFTConfig, SFTTrainer, TrainConfig
    from llm_trainer.generation import GenerateConfig, generate
    res: dict = {}
    ends: list[float] = []
    cpu_ends: list[float] = []
    marks = {}

    class Timed(SFTTrainer):
        def train_step(self, window):
            if not ends:
                marks["loaded"] = peak_rss_mb()
            out = super().train_step(window)
            ends.append(time.perf_counter())
            cpu_ends.append(cpu_s())
            if len(ends) == args.warmup + args.steps:
                marks["trained"] = peak_rss_mb()
            return out

        def export(self):
            t = time.perf_counter()
            path = super().export()
            res["export_s"] = time.perf_counter() - t
            return path

    lora = LoRAConfig(r=args.r, alpha=args.alpha, target_modules=TARGETS)
    cfg = TrainConfig(init_weights_path=os.path.join(args.dir, "model"),
                      file_dataset=[os.path.join(args.dir, f"sft_{args.seq}_{args.batch}_{args.warmup + args.steps}")],
                      dataset_block_size=args.seq, batch_size=args.batch, output_dir=os.path.join(args.dir, "ours"),
                      dtype="fp32", ds_config=None, max_steps=args.warmup + args.steps, save_interval=None,
                      eval_interval=None, log_interval=1000, max_grad_norm=1.0, seed=0, gradient_checkpointing=True,
                      lora=lora, optim_config=OptimConfig(initial_lr=1e-4, enable_lr_scheduler=False, weight_decay=0.0),
                      sft_config=SFTConfig(mask_prompt=False))
    trainer = Timed(train_config=cfg)
    trainer.train()
    marks["exported"] = peak_rss_mb()
    model = trainer.backend.unwrap(trainer.model)
    t = time.perf_counter()
    out = generate(model, [rows(args)[0][:32]], GenerateConfig(max_new_tokens=args.new_tokens, do_sample=False),
                   eos_token_ids=[])
    res["generate_s"] = time.perf_counter() - t
    marks["generated"] = peak_rss_mb()
    assert len(out.completions[0]) == args.new_tokens
    res.update(step_s=[b - a for a, b in zip(ends, ends[1:])][max(args.warmup - 1, 0):],
               step_cpu_s=[b - a for a, b in zip(cpu_ends, cpu_ends[1:])][max(args.warmup - 1, 0):], rss_mb=marks,
               peak_rss_mb=peak_rss_mb(),
               threads=torch.get_num_threads())
    return res


def run_ref(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    res: dict = {}
    marks = {}
    model = AutoModelForCausalLM.from_pretrained(os.path.join(args.dir, "model"), dtype=torch.float32)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=TARGETS,
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    marks["loaded"] = peak_rss_mb()
    data = torch.tensor(rows(args))
    times, cpu_times = [], []
    for step in range(args.warmup + args.steps):
        t, c = time.perf_counter(), cpu_s()
        ids = data[step * args.batch:(step + 1) * args.batch]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        cpu_times.append(cpu_s() - c)
    marks["trained"] = peak_rss_mb()
    model.eval()
    model.config.use_cache = True
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=data[:1, :32], max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                             do_sample=False)
    res["generate_s"] = time.perf_counter() - t
    marks["generated"] = peak_rss_mb()
    assert out.shape[1] == 32 + args.new_tokens
    t = time.perf_counter()
    model.merge_and_unload().save_pretrained(os.path.join(args.dir, "ref_final"))
    res["export_s"] = time.perf_counter() - t
    marks["exported"] = peak_rss_mb()
    res.update(step_s=times[args.warmup:], step_cpu_s=cpu_times[args.warmup:], rss_mb=marks, peak_rss_mb=peak_rss_mb(), threads=torch.get_num_threads())
    return res


def run_pair(args) -> None:
    """Both models in one process, one training step each in turn (same rows): the model compute alone, with no
    trainer around ours, and background load hitting both alike."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llm_trainer.model import LlmModel
    from llm_trainer.model.lora import apply_lora, lora_parameters
    folder = os.path.join(args.dir, "model")
    ours = apply_lora(LlmModel.from_pretrained(folder), r=args.r, alpha=args.alpha, target_modules=TARGETS)
    ours.set_gradient_checkpointing(True)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ref.config.use_cache = False
    ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = get_peft_model(ref, LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=TARGETS, lora_dropout=0.0,
                                         task_type="CAUSAL_LM"))
    opts = {"ours": torch.optim.AdamW(lora_parameters(ours), lr=1e-4, weight_decay=0.0),
            "ref": torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)}

    def loss_of(name, ids):
        if name == "ref":
            return ref(input_ids=ids, labels=ids).loss
        logits = ours(ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    ours.train(), ref.train()
    data = torch.tensor(rows(args))
    wall: dict[str, list[float]] = {"ours": [], "ref": []}
    cpu: dict[str, list[float]] = {"ours": [], "ref": []}
    for step in range(args.warmup + args.steps):
        ids = data[step * args.batch:(step + 1) * args.batch]
        for name in (("ours", "ref") if step % 2 == 0 else ("ref", "ours")):
            t, c = time.perf_counter(), cpu_s()
            loss_of(name, ids).backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            if step >= args.warmup:
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(cpu_s() - c)
    mw, mc = {k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()}
    print(f"pair (one process, alternating, batch {args.batch} x seq {args.seq}, {args.steps} steps each):")
    for k in ("ours", "ref"):
        print(f"  {k:<5} step wall {mw[k]:.2f} s [{fmt_range(wall[k])}]  CPU {mc[k]:.2f} s [{fmt_range(cpu[k])}]")
    print(f"  ours/ref: wall {mw['ours'] / mw['ref']:.2f}x, CPU {mc['ours'] / mc['ref']:.2f}x")


# ---------------------------------------------------------------------------------------------------------- main
def spawn(args, which: str) -> dict:
    cmd = [sys.executable, __file__, "--child", which] + [a for a in sys.argv[1:] if a != "--child"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{which} run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def fmt_range(xs: list[float], f: str = ".2f") -> str:
    return f"{min(xs):{f}}–{max(xs):{f}}" if len(xs) > 1 else f"{xs[0]:{f}}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/llm_trainer_real_size")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--only", choices=["ours", "ref"], default=None)
    ap.add_argument("--pair", action="store_true", help="instead: both models' training steps in one process")
    ap.add_argument("--child", choices=["ours", "ref"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        res = (run_ours if args.child == "ours" else run_ref)(args)
        with open(os.path.join(args.dir, "results.jsonl"), "a") as f:     # every run, for later inspection
            f.write(json.dumps({"run": args.child, "seq": args.seq, "batch": args.batch, **res}) + "\n")
        print("RESULT " + json.dumps(res), flush=True)
        return
    os.makedirs(args.dir, exist_ok=True)
    build(args)
    if args.pair:
        run_pair(args)
        return
    which = [args.only] if args.only else ["ours", "ref"]
    results: dict[str, list[dict]] = {w: [] for w in which}
    for rep in range(args.repeats):
        for w in (which if rep % 2 == 0 else which[::-1]):
            r = spawn(args, w)
            results[w].append(r)
            print(f"repeat {rep} {w:<4}: step {statistics.median(r['step_s']):.2f} s (steps "
                  f"{', '.join(f'{x:.2f}' for x in r['step_s'])}), peak RSS {r['peak_rss_mb']:.0f} MB "
                  f"{r['rss_mb']}, generate {r['generate_s']:.2f} s, export {r['export_s']:.2f} s", flush=True)
    print(f"\nQwen2.5-0.5B-shaped, batch {args.batch} x seq {args.seq}, LoRA r={args.r} alpha={args.alpha:g} on "
          f"{len(TARGETS)} projections, gradient checkpointing, fp32, {args.steps} timed steps, {args.repeats} "
          f"repeats")
    summary = {}
    for w, rs in results.items():
        step = [statistics.median(r["step_s"]) for r in rs]
        cpu = [statistics.median(r["step_cpu_s"]) for r in rs]
        peak = [r["peak_rss_mb"] for r in rs]
        train_peak = [r["rss_mb"]["trained"] for r in rs]
        summary[w] = (statistics.median(step), statistics.median(peak), statistics.median(train_peak),
                      statistics.median(cpu))
        print(f"  {w:<5} step {fmt_range(step)} s (CPU {fmt_range(cpu)} s)   peak RSS {fmt_range(peak, '.0f')} MB   peak RSS until the end of "
              f"training {fmt_range(train_peak, '.0f')} MB   generate {fmt_range([r['generate_s'] for r in rs])} s"
              f"   export {fmt_range([r['export_s'] for r in rs])} s")
    if len(summary) == 2:
        (so, po, to, co), (sr, pr, tr, cr) = summary["ours"], summary["ref"]
        print(f"  ours/ref: step time {so / sr:.2f}x (CPU time {co / cr:.2f}x), peak RSS {po / pr:.2f}x, training "
              f"peak RSS {to / tr:.2f}x")


if __name__ == "__main__":
    main()
