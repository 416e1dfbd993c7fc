"""What a run prints about itself: the start-up summary block and the closing line."""
from __future__ import annotations

from typing import Any

from ..metrics import format_duration, format_si


def count_tokens(dataset: Any) -> int | None:
    """Tokens in a dataset when it knows them cheaply (memory-mapped token files, indexed folders, their
    concatenations and filtered views); None otherwise (a list of dicts, a stream)."""
    if dataset is None:
        return None
    if isinstance(getattr(dataset, "num_tokens", None), int):
        return dataset.num_tokens
    data = getattr(dataset, "data", None)
    if data is not None and hasattr(data, "lengths"):
        return int(data.lengths().sum())
    parts = getattr(dataset, "datasets", None)
    if parts is not None:
        counts = [count_tokens(d) for d in parts]
        return None if any(c is None for c in counts) else sum(counts)
    base = getattr(dataset, "base", None)
    return count_tokens(base) if base is not None and base is not dataset else None


def _data_line(name: str, dataset: Any) -> str:
    if dataset is None:
        return f"{name}: none"
    try:
        n = f"{len(dataset):,} samples"
    except TypeError:
        return f"{name}: streamed (length unknown)"
    tokens = count_tokens(dataset)
    return f"{name}: {n}" + (f", {format_si(tokens)} tokens" if tokens else "")


def format_summary(trainer: Any) -> str:
    """The start-up block: model size, trainable parameters, data, steps, world size and backend, precision,
    output folder, and where the run resumed from."""
    cfg, backend = trainer.config, trainer.backend
    plain = backend.unwrap(trainer.model)
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in plain.parameters())
    trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in plain.parameters()
                    if p.requires_grad)
    lora = f", LoRA r={cfg.lora.r}" if cfg.lora is not None else ""
    per_update = cfg.batch_size * trainer.grad_accum * backend.world_size
    steps = trainer.steps_per_epoch()
    lines = [
        f"{type(trainer).__name__} ({trainer.stage})",
        f"  model      {type(plain).__name__}: {format_si(total)} parameters, {format_si(trainable)} trainable{lora}",
        f"  data       {_data_line('train', trainer.train_dataset)}; {_data_line('eval', trainer.eval_dataset)}",
        f"  steps      {steps:,} per epoch × {cfg.n_epochs} epoch(s) → {trainer.total_steps:,} optimizer steps"
        if steps else f"  steps      {trainer.total_steps:,} optimizer steps (max_steps)",
        f"  batch      {cfg.batch_size} per rank × accumulation {trainer.grad_accum} × {backend.world_size} rank(s) "
        f"= {per_update} per update",
        f"  backend    {backend.name} on {backend.world_size} rank(s), device {backend.device}, precision "
        f"{backend.dtype}",
        f"  output     {trainer.output_dir}",
    ]
    if trainer.resumed_from is not None:
        lines.append(f"  resumed    from {trainer.resumed_from.name} (step {trainer.global_step})")
    return "\n".join(lines)


def format_closing(trainer: Any, last: dict[str, Any], seconds: float, final: Any) -> str:
    """One line at the end: steps, time, the last loss (and eval metrics), and where the model was saved."""
    parts = [f"done: {trainer.global_step:,} steps in {format_duration(seconds)}"]
    for key in ("loss", "eval_loss", "eval_reward"):
        if isinstance(last.get(key), (int, float)):
            parts.append(f"{key} {last[key]:.4g}")
    text = ", ".join(parts)
    return f"{text}; saved to {final}" if final is not None else text
