"""Multi-stage TOML pipelines: ``llm-trainer run pipeline.toml`` (the file format: ``docs/pipeline.md``).

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
train = { file_dataset = ["data/rl"] }
reward = "my_rewards:exact_match"       # module:function for RL stages
```

Relative paths in the file (``output_dir``, ``tokenizer``, ``init_weights_path``, ``file_dataset``,
``eval_file_dataset`` and the stage configs' weight paths) are relative to the file's folder, whatever the working
directory. Each stage starts from the previous stage's exported model (``<previous>/final``) unless its own
``train.init_weights_path`` says otherwise. A finished stage leaves ``<stage>/final/DONE``; rerunning the pipeline
skips finished stages and resumes an interrupted one from its latest checkpoint (``resume_from='auto'``), so a
killed pipeline continues where it stopped.

Everything is validated before any stage trains: unknown top-level or stage keys (with the closest valid name),
stage types and names, every config, RL reward imports, ``--only`` names, and every path the stages about to run
read (data, tokenizer, initial/reference/value/teacher weights), except paths inside an earlier stage's folder
(that stage writes them). Errors raise `PipelineError` naming the stage and field (``llm-trainer run`` prints it and
exits with code 2).
"""
from __future__ import annotations

import copy
import difflib
import importlib
import importlib.machinery
import os
import sys
from pathlib import Path
from typing import Any, Callable

from .config_io import deep_merge
from .configs import (ClassifyConfig, DPOConfig, GRPOConfig, PPOConfig, PretrainConfig, RewardConfig, SFTConfig,
                      TrainConfig,
                      load_dict)

STAGES: dict[str, tuple[str, str, type]] = {
    "pretrain": ("Trainer", "pretrain_config", PretrainConfig),
    "sft": ("SFTTrainer", "sft_config", SFTConfig),
    "dpo": ("DPOTrainer", "dpo_config", DPOConfig),
    "reward": ("RewardTrainer", "reward_config", RewardConfig),
    "grpo": ("GRPOTrainer", "grpo_config", GRPOConfig),
    "ppo": ("PPOTrainer", "ppo_config", PPOConfig),
    "classify": ("ClassificationTrainer", "classify_config", ClassifyConfig),
}
DONE_MARKER = "DONE"


TOP_LEVEL_KEYS = ("output_dir", "tokenizer", "init_weights_path", "model", "train", "stages")
STAGE_KEYS = ("name", "type", "train", "config", "eval_prompts", "reward")


class PipelineError(ValueError):
    pass


def _check_keys(table: dict[str, Any], valid: tuple[str, ...], where: str) -> None:
    """PipelineError for the first key of ``table`` not in ``valid``, with the closest valid names."""
    for key in table:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=2)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise PipelineError(f"{where}: unknown key {key!r}{hint} (valid: {', '.join(valid)})")


def _forget_shadowed(module: str) -> str:
    """Drop a cached top-level ``module`` when ``sys.path`` now finds another file of that name first (e.g. the
    ``rewards.py`` beside this config file, while an earlier run imported another folder's ``rewards.py``)."""
    cached = sys.modules.get(module)
    if "." in module or cached is None or not getattr(cached, "__file__", None):
        return module
    found = importlib.machinery.PathFinder.find_spec(module)
    if found is not None and found.origin and os.path.realpath(found.origin) != os.path.realpath(cached.__file__):
        del sys.modules[module]
    return module


def import_callable(spec: str, where: str) -> Callable:
    """``"package.module:function"`` → the function (the pipeline file's folder is importable)."""
    if ":" not in spec:
        raise PipelineError(f"{where}: expected 'module:function', got {spec!r}")
    module, name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(_forget_shadowed(module)), name)
    except (ImportError, AttributeError) as e:
        raise PipelineError(f"{where}: cannot import {spec!r}: {e}") from e
    if not callable(fn):
        raise PipelineError(f"{where}: {spec!r} is not callable")
    return fn


PATH_FIELDS = ("tokenizer", "init_weights_path")
PATH_LIST_FIELDS = ("file_dataset", "eval_file_dataset")
STAGE_PATH_FIELDS = ("ref_model_weights_path", "value_model_weights_path")
"""Weight paths in a stage's own config (``config = {...}``); ``kd_config.teacher_model_path`` is one too."""


def resolve_path(value: Any, root: Path) -> Any:
    """A relative path string → ``root / value`` (absolute paths and non-strings are kept)."""
    if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
        return str(root / value)
    return str(Path(value).expanduser()) if isinstance(value, str) and value else value


def resolve_paths(train: dict[str, Any], stage_config: dict[str, Any], root: Path) -> None:
    """Relative data/tokenizer/weights paths in the pipeline file are relative to the file's folder (as
    ``output_dir`` is), so ``llm-trainer run dir/pipeline.toml`` works from any working directory."""
    for key in PATH_FIELDS:
        if key in train:
            train[key] = resolve_path(train[key], root)
    for key in PATH_LIST_FIELDS:
        value = train.get(key)
        if isinstance(value, str):
            train[key] = resolve_path(value, root)
        elif isinstance(value, list):
            train[key] = [resolve_path(v, root) for v in value]
    for key in STAGE_PATH_FIELDS:
        if key in stage_config:
            stage_config[key] = resolve_path(stage_config[key], root)
    kd = stage_config.get("kd_config")
    if isinstance(kd, dict) and "teacher_model_path" in kd:
        kd["teacher_model_path"] = resolve_path(kd["teacher_model_path"], root)


def input_paths(cfg: TrainConfig, field_name: str) -> list[tuple[str, str]]:
    """(field, path) of every path a stage reads: data, tokenizer and weights."""
    found = [(f"train.{k}", getattr(cfg, k)) for k in PATH_FIELDS]
    for key in PATH_LIST_FIELDS:
        value = getattr(cfg, key)
        found += [(f"train.{key}", v) for v in ([value] if isinstance(value, str) else value or [])]
    stage = getattr(cfg, field_name)
    found += [(f"config.{k}", getattr(stage, k, None)) for k in STAGE_PATH_FIELDS]
    found.append(("config.kd_config.teacher_model_path",
                  getattr(getattr(stage, "kd_config", None), "teacher_model_path", None)))
    return [(where, p) for where, p in found if isinstance(p, str)]


def _within(path: str, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


def check_inputs(planned: list[dict[str, Any]], names: set[str]) -> None:
    """PipelineError listing every input path of the stages in ``names`` that does not exist, before any of them
    trains. A path inside an earlier stage's folder is that stage's output and is not required yet; one inside a
    later stage's folder is an error. A stage without ``file_dataset`` is reported too; a path is reported once."""
    problems, seen = [], set()
    for i, stage in enumerate(planned):
        if stage["name"] not in names:
            continue
        cfg = stage["kwargs"]["train_config"]
        where = f"stages[{i}] ({stage['name']!r})"
        if not cfg.file_dataset:
            problems.append(f"{where}.train.file_dataset: not set (a stage needs its data)")
        for field, path in input_paths(cfg, STAGES[stage["type"]][1]):
            if path in seen:
                continue
            seen.add(path)
            producer = next((j for j, p in enumerate(planned) if _within(path, p["dir"])), i)
            if producer < i:
                continue  # written by an earlier stage
            if producer > i:
                problems.append(f"{where}.{field}: {path} is written by the stage {planned[producer]['name']!r}, "
                                "which runs later")
            elif not Path(path).exists():
                problems.append(f"{where}.{field}: {path} does not exist")
    if problems:
        raise PipelineError("missing inputs (nothing has run):\n  " + "\n  ".join(problems))


def plan(pipeline: dict[str, Any], root: Path) -> list[dict[str, Any]]:
    """Validate the pipeline and return one entry per stage: name, type, trainer kwargs, output folder.

    Relative paths (``output_dir``, ``tokenizer``, ``init_weights_path``, ``file_dataset``, ``eval_file_dataset``)
    are taken relative to ``root`` (the pipeline file's folder). A stage starts from the previous stage's export,
    or from its own ``train.init_weights_path`` when it sets one (the first stage: the top-level one)."""
    _check_keys(pipeline, TOP_LEVEL_KEYS, "pipeline")
    for key in ("model", "train"):
        if not isinstance(pipeline.get(key, {}), dict):
            raise PipelineError(f"pipeline: {key} must be a table ([{key}]), got {pipeline[key]!r}")
    stages = pipeline.get("stages")
    if not isinstance(stages, list) or not stages or not all(isinstance(st, dict) for st in stages):
        raise PipelineError("pipeline: needs at least one [[stages]] table")
    out_root = Path(resolve_path(str(pipeline.get("output_dir", "runs/pipeline")), root))
    names: set[str] = set()
    planned = []
    previous_final: str | None = resolve_path(pipeline.get("init_weights_path"), root)
    previous_name: str | None = None
    if "output_dir" in pipeline.get("train", {}):
        raise PipelineError("pipeline: [train].output_dir: set the top-level output_dir instead (each stage writes "
                            "output_dir/<stage name>)")
    for i, st in enumerate(stages):
        kind = st.get("type")
        name = st.get("name", kind)
        where = f"stages[{i}] ({name!r})" if name is not None else f"stages[{i}]"
        _check_keys(st, STAGE_KEYS, where)
        if kind not in STAGES:
            raise PipelineError(f"{where}.type: {kind!r} is not one of {sorted(STAGES)}")
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise PipelineError(f"{where}.name: {name!r} must be a plain folder name")
        if name in names:
            raise PipelineError(f"{where}.name: {name!r} is used twice; stage names must be unique")
        names.add(name)
        for key in ("train", "config"):
            if not isinstance(st.get(key, {}), dict):
                raise PipelineError(f"{where}.{key}: must be a table ({key} = {{ ... }}), got {st[key]!r}")
        trainer_cls, field_name, stage_cls = STAGES[kind]
        stage_train = dict(st.get("train", {}))
        if "output_dir" in stage_train:
            raise PipelineError(f"{where}.train.output_dir: set by the pipeline (output_dir/<stage name>)")
        train = deep_merge(pipeline.get("train", {}), stage_train)
        if "model" in pipeline:
            train.setdefault("model_config", pipeline["model"])
        if "tokenizer" in pipeline:
            train.setdefault("tokenizer", pipeline["tokenizer"])
        stage_config = copy.deepcopy(st.get("config", {}))
        resolve_paths(train, stage_config, root)
        stage_dir = out_root / name
        train["output_dir"] = str(stage_dir)
        train.setdefault("resume_from", "auto")
        after = None
        if "init_weights_path" not in stage_train and previous_final is not None:
            train["init_weights_path"] = previous_final
            after = previous_name
        train[field_name] = stage_config
        try:
            cfg = TrainConfig.from_dict(train)
        except (TypeError, ValueError) as e:
            raise PipelineError(f"{where}: {e}") from e
        if getattr(cfg, field_name) is None:
            setattr(cfg, field_name, stage_cls())
        if not isinstance(getattr(cfg, field_name), stage_cls):
            raise PipelineError(f"{where}.config: expected {stage_cls.__name__} fields, got "
                                f"{type(getattr(cfg, field_name)).__name__}")
        kwargs: dict[str, Any] = {"train_config": cfg, "eval_prompts": st.get("eval_prompts", [])}
        if kind in ("grpo", "ppo"):
            if "reward" not in st:
                raise PipelineError(f"{where}: an RL stage needs reward = 'module:function'")
            kwargs["reward_func"] = st["reward"]
        planned.append({"name": name, "type": kind, "trainer": trainer_cls, "kwargs": kwargs, "dir": stage_dir,
                        "after": after})
        previous_final, previous_name = str(stage_dir / "final"), name
    return planned


def load_pipeline(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no such pipeline file")
    try:
        return load_dict(path)
    except Exception as e:  # noqa: BLE001 - TOML/JSON syntax errors, wrong suffix
        raise PipelineError(f"{path}: cannot read the pipeline: {e}") from e


def run_pipeline(path: str | Path, only: list[str] | None = None) -> list[Path]:
    """Run (or resume) every stage of the pipeline file; returns the exported model folder of each stage.

    Everything is validated first (keys, configs, RL reward imports, ``only`` names, the input paths of the stages
    that will run), so a bad file fails before any stage trains."""
    path = Path(path).resolve()
    pipeline = load_pipeline(path)
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    from .trainers import trainer_class
    stages = plan(pipeline, path.parent)
    if only:
        unknown = sorted(set(only) - {st["name"] for st in stages})
        if unknown:
            raise PipelineError(f"--only: no stage named {unknown}; stages are {[st['name'] for st in stages]}")
    for stage in stages:
        if isinstance(stage["kwargs"].get("reward_func"), str):
            stage["kwargs"]["reward_func"] = import_callable(stage["kwargs"]["reward_func"],
                                                             f"stage {stage['name']!r}.reward")
    to_run = {st["name"] for st in stages if (not only or st["name"] in only)
              and not (st["dir"] / "final" / DONE_MARKER).is_file()}
    check_inputs(stages, to_run)
    finals = []
    for stage in stages:
        final = stage["dir"] / "final"
        finals.append(final)
        if only and stage["name"] not in only:
            continue
        if (final / DONE_MARKER).is_file():
            print(f"[pipeline] {stage['name']}: done already ({final}), skipping", flush=True)
            continue
        init = stage["kwargs"]["train_config"].init_weights_path
        if stage["after"] is not None and not (Path(init) / DONE_MARKER).is_file():
            raise PipelineError(f"stage {stage['name']!r} starts from stage {stage['after']!r}, which has not "
                                f"finished ({init} has no {DONE_MARKER}); run it first")
        print(f"[pipeline] {stage['name']}: {stage['type']} → {stage['dir']}", flush=True)
        trainer = trainer_class(stage["type"])(**dict(stage["kwargs"]))
        trainer.train()
        if trainer.backend.is_main:
            (final / DONE_MARKER).write_text("ok\n")
        trainer.backend.barrier()
    return finals
