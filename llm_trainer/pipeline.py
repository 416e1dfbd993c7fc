"""Multi-stage TOML pipelines: ``llm-trainer run pipeline.toml``.

```toml
output_dir = "runs/my_model"          # each stage writes output_dir/<stage name>/
tokenizer = "tokenizer/tokenizer.json"
init_weights_path = "base_model/"      # optional: the first stage starts from it

[model]                                 # ModelConfig fields (ignored when init_weights_path is an HF folder)
hidden_size = 256

[train]                                 # TrainConfig fields shared by every stage
batch_size = 8

[[stages]]
name = "pretrain"
type = "pretrain"                       # pretrain | sft | dpo | reward | grpo | ppo
train = { n_epochs = 1, file_dataset = ["data/pretrain.npy"] }
config = { gradient_accumulation_steps = 2 }    # the stage's own config (PretrainConfig, SFTConfig, ...)

[[stages]]
name = "grpo"
type = "grpo"
reward = "my_rewards:exact_match"       # module:function for RL stages
```

Each stage starts from the previous stage's exported model (``<previous>/final``). A finished stage leaves
``<stage>/final/DONE``; rerunning the pipeline skips finished stages and resumes an interrupted one from its
latest checkpoint (``resume_from='auto'``), so a killed pipeline continues where it stopped.
"""
from __future__ import annotations

import copy
import importlib
import sys
from pathlib import Path
from typing import Any, Callable

from .configs import (DPOConfig, GRPOConfig, PPOConfig, PretrainConfig, RewardConfig, SFTConfig, TrainConfig,
                      load_dict)

STAGES: dict[str, tuple[str, str, type]] = {
    "pretrain": ("Trainer", "pretrain_config", PretrainConfig),
    "sft": ("SFTTrainer", "sft_config", SFTConfig),
    "dpo": ("DPOTrainer", "dpo_config", DPOConfig),
    "reward": ("RewardTrainer", "reward_config", RewardConfig),
    "grpo": ("GRPOTrainer", "grpo_config", GRPOConfig),
    "ppo": ("PPOTrainer", "ppo_config", PPOConfig),
}
DONE_MARKER = "DONE"


class PipelineError(ValueError):
    pass


def import_callable(spec: str, where: str) -> Callable:
    """``"package.module:function"`` → the function (the pipeline file's folder is importable)."""
    if ":" not in spec:
        raise PipelineError(f"{where}: expected 'module:function', got {spec!r}")
    module, name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise PipelineError(f"{where}: cannot import {spec!r}: {e}") from e
    if not callable(fn):
        raise PipelineError(f"{where}: {spec!r} is not callable")
    return fn


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def plan(pipeline: dict[str, Any], root: Path) -> list[dict[str, Any]]:
    """Validate the pipeline and return one entry per stage: name, type, trainer kwargs, output folder."""
    stages = pipeline.get("stages")
    if not isinstance(stages, list) or not stages:
        raise PipelineError("pipeline: needs at least one [[stages]] table")
    out_root = root / pipeline.get("output_dir", "runs/pipeline")
    names: set[str] = set()
    planned = []
    previous_final: str | None = pipeline.get("init_weights_path")
    for i, st in enumerate(stages):
        where = f"stages[{i}]"
        kind = st.get("type")
        if kind not in STAGES:
            raise PipelineError(f"{where}.type: {kind!r} is not one of {sorted(STAGES)}")
        name = st.get("name", kind)
        if name in names:
            raise PipelineError(f"{where}.name: {name!r} is used twice; stage names must be unique")
        names.add(name)
        trainer_cls, field_name, stage_cls = STAGES[kind]
        train = _merge(pipeline.get("train", {}), st.get("train", {}))
        if "model" in pipeline:
            train.setdefault("model_config", pipeline["model"])
        if "tokenizer" in pipeline:
            train.setdefault("tokenizer", pipeline["tokenizer"])
        stage_dir = out_root / name
        train["output_dir"] = str(stage_dir)
        train.setdefault("resume_from", "auto")
        if previous_final is not None:
            train["init_weights_path"] = previous_final
        train[field_name] = st.get("config", {})
        try:
            cfg = TrainConfig.from_dict(train)
        except (TypeError, ValueError) as e:
            raise PipelineError(f"{where} ({name}): {e}") from e
        if not isinstance(getattr(cfg, field_name), stage_cls):
            setattr(cfg, field_name, stage_cls())
        kwargs: dict[str, Any] = {"train_config": cfg, "eval_prompts": st.get("eval_prompts", [])}
        if kind in ("grpo", "ppo"):
            if "reward" not in st:
                raise PipelineError(f"{where} ({name}): an RL stage needs reward = 'module:function'")
            kwargs["reward_func"] = st["reward"]
        planned.append({"name": name, "type": kind, "trainer": trainer_cls, "kwargs": kwargs, "dir": stage_dir})
        previous_final = str(stage_dir / "final")
    return planned


def run_pipeline(path: str | Path, only: list[str] | None = None) -> list[Path]:
    """Run (or resume) every stage of the pipeline file; returns the exported model folder of each stage."""
    path = Path(path).resolve()
    pipeline = load_dict(path)
    sys.path.insert(0, str(path.parent))
    import llm_trainer
    finals = []
    for stage in plan(pipeline, path.parent):
        final = stage["dir"] / "final"
        finals.append(final)
        if only and stage["name"] not in only:
            continue
        if (final / DONE_MARKER).is_file():
            print(f"[pipeline] {stage['name']}: done already ({final}), skipping", flush=True)
            continue
        print(f"[pipeline] {stage['name']}: {stage['type']} → {stage['dir']}", flush=True)
        kwargs = dict(stage["kwargs"])
        if isinstance(kwargs.get("reward_func"), str):
            kwargs["reward_func"] = import_callable(kwargs["reward_func"], f"stage {stage['name']}.reward")
        trainer = getattr(llm_trainer, stage["trainer"])(**kwargs)
        trainer.train()
        if trainer.backend.is_main:
            (final / DONE_MARKER).write_text("ok\n")
        trainer.backend.barrier()
    return finals
