"""QLoRA on CPU: the quantization back-ends, base-weight memory and the loss gap to bf16 LoRA.

    python scripts/bench/qlora.py                 # all three parts; the loss part takes longest (~30 min here)
    python scripts/bench/qlora.py --only kernels --repeats 5

1. **kernels** — one Qwen2.5-0.5B MLP projection (896 → 4864, the largest linear shape of that model) on 256 tokens:
   forward + backward through a frozen quantized weight (the input gradient, as LoRA needs), median over
   ``--repeats`` interleaved rounds, next to the same matmul with an fp32 and a bf16 weight, and the weight's bytes
   relative to bf16. Candidates: bitsandbytes NF4 (``dequantize_4bit`` + matmul, what `llm_trainer.model.quant`
   does; ``bnb.matmul_4bit``), torchao NF4 (``linear_nf4``), bitsandbytes int8 (``Linear8bitLt``), our int8
   (plain torch dequantize + matmul). A candidate whose package is missing is reported as such.
2. **memory** — ``quantize_base(apply_lora(...))`` on a 24-layer Qwen2.5-0.5B-shaped model (random weights, the real
   config): bytes of the quantized base linear weights vs the same weights in bf16, and the process RSS after
   quantizing (the fp32 model is built first, one layer at a time is then replaced).
3. **loss gap** — a small Qwen2-style model (hidden ``--hidden``, ``--layers`` layers) is first pretrained on
   Python standard-library source (byte-level BPE of 1024 tokens) so that its weights carry structure; then LoRA
   (r 16, all projections) is trained from it for ``--lora-steps`` steps on other files, with the frozen base in
   bf16 (the reference) / NF4 / int8 — same adapter init, same batches, AdamW lr 1e-3, bf16 autocast — and the
   per-step training losses are compared (mean |gap| and the gap of the mean of the last 10 steps), plus an
   fp32-base run for scale.
"""
from __future__ import annotations

import argparse
import glob
import os
import resource
import statistics
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


# ------------------------------------------------------------------------------------------------------- kernels
def kernel_candidates(w: torch.Tensor) -> dict:
    """name -> (fn(x) -> y, bytes of the stored weight) for every candidate that imports."""
    out = {"fp32 weight": (lambda x: F.linear(x, w), w.numel() * 4)}
    wb = w.bfloat16()
    out["bf16 weight"] = (lambda x: F.linear(x.bfloat16(), wb).float(), w.numel() * 2)
    from llm_trainer.model.quant import QuantLinear
    for qt in ("nf4", "int8"):
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data.copy_(w)
        lin.requires_grad_(False)
        try:
            q = QuantLinear(lin, qt)
        except ImportError as e:
            print(f"  llm_trainer {qt}: unavailable ({e})")
            continue
        name = "llm_trainer nf4 (bitsandbytes dequantize_4bit)" if qt == "nf4" else "llm_trainer int8 (torch)"
        out[name] = (q, q.quantized_nbytes())
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
        codes, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        out["bitsandbytes matmul_4bit"] = (lambda x: bnb.matmul_4bit(x, codes.t(), quant_state=state),
                                           codes.numel() + state.absmax.numel() * 4)
        l8 = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=False, has_fp16_weights=False, threshold=0.0)
        l8.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
        l8 = l8.to("cpu")
        out["bitsandbytes Linear8bitLt"] = (l8, l8.weight.numel() + l8.weight.SCB.numel() * 4)
    except ImportError as e:
        print(f"  bitsandbytes: unavailable ({e})")
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4
        n = to_nf4(w, block_size=64, scaler_block_size=256)
        nbytes = sum(getattr(n, a).numel() * getattr(n, a).element_size()
                     for a in ("quantized_data", "quantized_scalers", "scaler_mean"))
        out["torchao linear_nf4"] = (lambda x: linear_nf4(x, n), nbytes)
    except ImportError as e:
        print(f"  torchao: unavailable ({e})")
    return out


def bench_kernels(args) -> None:
    torch.manual_seed(0)
    w = torch.randn(4864, 896) * 0.02
    x0 = torch.randn(1, 256, 896)
    cands = kernel_candidates(w)
    times: dict[str, list[float]] = {k: [] for k in cands}
    ref = F.linear(x0, w)
    for _ in range(args.repeats):
        for name, (fn, _) in cands.items():
            x = x0.clone().requires_grad_(True)
            t = time.perf_counter()
            y = fn(x)
            y.float().sum().backward()
            times[name].append(time.perf_counter() - t)
    print(f"\nkernels: W 4864x896 frozen, x 256x896, forward + input-gradient backward, median of {args.repeats}, "
          f"{torch.get_num_threads()} threads")
    base = statistics.median(times["fp32 weight"])
    for name, (fn, nbytes) in cands.items():
        with torch.no_grad():
            err = ((fn(x0).float() - ref).norm() / ref.norm()).item()
        t = statistics.median(times[name])
        print(f"  {name:<48} {t * 1e3:8.1f} ms ({t / base:4.2f}x fp32)  weight bytes {nbytes / (w.numel() * 2):.3f}x "
              f"bf16  output rel. error {err:.4f}  [{min(times[name]) * 1e3:.1f}-{max(times[name]) * 1e3:.1f} ms]")


# -------------------------------------------------------------------------------------------------------- memory
def bench_memory(args) -> None:
    from llm_trainer.model import LlmModel, ModelConfig
    from llm_trainer.model.lora import apply_lora
    from llm_trainer.model.quant import quantize_base, quantized_weight_nbytes
    sys.path.insert(0, os.path.dirname(__file__))
    from real_size import QWEN25_05B
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlmModel(ModelConfig(**QWEN25_05B))
    model = model.to_empty(device="cpu")
    model.init_weights()
    rss_full = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    quantize_base(apply_lora(model, r=16, alpha=32), args.quant)
    dt = time.perf_counter() - t
    nbytes, numel = quantized_weight_nbytes(model)
    import gc
    gc.collect()
    with open("/proc/self/status") as f:
        rss_now = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    print(f"\nmemory: Qwen2.5-0.5B shape, {args.quant} base: {numel / 1e6:.1f}M linear weights in "
          f"{nbytes / 2**20:.1f} MiB vs {numel * 2 / 2**20:.1f} MiB bf16 = {nbytes / (numel * 2):.3f}x "
          f"({nbytes * 8 / numel:.2f} bits/weight); quantizing took {dt:.1f} s; process RSS {rss_full:.0f} MB with "
          f"the fp32 model -> {rss_now:.0f} MB after (embedding {model.config.vocab_size * 896 * 4 / 2**20:.0f} MiB "
          f"fp32 stays)")


# ------------------------------------------------------------------------------------------------------ loss gap
def corpus_ids(tok, files: list[str], n_tokens: int) -> torch.Tensor:
    ids: list[int] = []
    for f in files:
        ids += tok.encode(open(f, encoding="utf-8", errors="ignore").read())
        if len(ids) >= n_tokens:
            break
    return torch.tensor(ids[:n_tokens])


def batches(data: torch.Tensor, seq: int, batch: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        yield torch.stack([data[s:s + seq + 1] for s in starts])


def lm_loss(model, ids):
    logits = model(ids[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def bench_loss_gap(args) -> None:
    from llm_trainer.model import LlmModel, ModelConfig
    from llm_trainer.model.lora import apply_lora, lora_parameters
    from llm_trainer.tokenizer import train_tokenizer
    src = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    work = tempfile.mkdtemp(prefix="bench_qlora_")
    half = len(src) // 2
    sample = os.path.join(work, "tokenizer_corpus.txt")            # train_tokenizer reads .txt / .jsonl files
    with open(sample, "w", encoding="utf-8") as out:
        for f in src[:40]:
            out.write(open(f, encoding="utf-8", errors="ignore").read())
    tok = train_tokenizer([sample], 1024, os.path.join(work, "tok"), show_progress=False)
    pre, fine = corpus_ids(tok, src[:half], 2_000_000), corpus_ids(tok, src[half:], 500_000)
    cfg = ModelConfig(vocab_size=1024, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 64, num_key_value_heads=max(args.hidden // 128, 1),
                      max_position_embeddings=512, attention_bias=True, architecture="qwen2")
    torch.manual_seed(0)
    model = LlmModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    t = time.perf_counter()
    for i, ids in enumerate(batches(pre, 128, 8, args.pretrain_steps, 0)):
        loss = lm_loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if (i + 1) % 25 == 0:
            print(f"  pretraining step {i + 1}: loss {loss.item():.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
    print(f"\nloss gap: pretrained {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter model for "
          f"{args.pretrain_steps} steps ({time.perf_counter() - t:.0f} s), final pretraining loss {loss.item():.3f}")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    curves = {}
    for variant in ("bf16", "nf4", "int8", "fp32"):
        m = LlmModel(cfg)
        m.load_state_dict(base_state)
        torch.manual_seed(1)
        apply_lora(m, r=16, alpha=32)
        if variant == "bf16":
            for mod in m.modules():
                if hasattr(mod, "lora_A"):
                    mod.weight.data = mod.weight.data.bfloat16()
        elif variant in ("nf4", "int8"):
            from llm_trainer.model.quant import quantize_base
            quantize_base(m, variant)
        opt = torch.optim.AdamW(lora_parameters(m), lr=1e-3, weight_decay=0.0)
        losses = []
        for ids in batches(fine, 128, 8, args.lora_steps, 1):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant != "fp32"):
                loss = lm_loss(m, ids)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        curves[variant] = losses
        print(f"  {variant} LoRA run done ({len(losses)} steps)", flush=True)
    ref = curves["bf16"]
    print(f"  LoRA r=16 on all projections, {args.lora_steps} steps, batch 8 x 128, same batches and adapter init")
    for variant, losses in curves.items():
        gap = statistics.mean(abs(a - b) for a, b in zip(losses, ref))
        last = statistics.mean(losses[-10:])
        print(f"  {variant:<5} base: first loss {losses[0]:.4f}, mean of last 10 {last:.4f} "
              f"(vs bf16 {last - statistics.mean(ref[-10:]):+.4f}), mean |loss - bf16 loss| per step {gap:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["kernels", "memory", "loss"], default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quant", choices=["nf4", "int8"], default="nf4", help="for the memory part")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--pretrain-steps", type=int, default=150)
    ap.add_argument("--lora-steps", type=int, default=40)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.only in (None, "kernels"):
        bench_kernels(args)
    if args.only in (None, "memory"):
        bench_memory(args)
    if args.only in (None, "loss"):
        bench_loss_gap(args)


if __name__ == "__main__":
    main()
