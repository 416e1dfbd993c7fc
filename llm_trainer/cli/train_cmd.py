"""``llm-trainer {pretrain,sft,dpo,reward,grpo,ppo,distill} --config FILE [key=value ...]``: one training stage from
a config file, without a script (the file format and examples: ``docs/cli.md``, ``example/configs/``).

The file is a flat :class:`~llm_trainer.configs.TrainConfig` table (``batch_size = 8``, ``[optim_config]``,
``[model_config]`` ...) with the method's stage config in its slot (``[sft_config]``, ``[grpo_config]`` ...) and a
``[run]`` table (:class:`RunConfig`) for what is not a TrainConfig field: the RL ``reward``, ``eval_prompts``,
``callbacks`` and ``evaluators``. ``distill`` is SFT with a teacher in ``[sft_config.kd_config]`` (pretraining with
distillation is ``pretrain`` with ``[pretrain_config.kd_config]``). TOML, JSON and — with ``pyyaml`` — YAML files
are read.

Relative paths in the file are relative to the file's folder (as in pipelines: :func:`llm_trainer.pipeline.
resolve_paths`); relative paths given as ``key=value`` on the command line are relative to the working directory;
``output_dir`` defaults to ``runs/<method>`` in the working directory. The file's folder is put on ``sys.path`` so
``module:name`` imports find modules next to it. The resolved config (absolute paths, every default filled in) is
what ``--print-config`` prints and what is written to ``output_dir/config.toml`` — a file this command runs again.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config_io import ConfigMixin, deep_merge, dict_to_toml, from_dict, load_dict, parse_overrides
from ..configs import TrainConfig
from ..pipeline import STAGES, import_callable, input_paths, resolve_path, resolve_paths

METHODS: dict[str, str] = {"pretrain": "pretrain", "sft": "sft", "dpo": "dpo", "reward": "reward", "grpo": "grpo",
                           "ppo": "ppo", "classify": "classify", "distill": "sft"}
"""Command → the stage type that trains it (``distill`` is SFT with a teacher)."""
RL_STAGES = ("grpo", "ppo")
RESOLVED_CONFIG = "config.toml"

_HELP = {"pretrain": "pretrain a language model on token files", "sft": "supervised fine-tuning on chat data",
         "dpo": "direct preference optimisation (and IPO, ORPO, SimPO ...)", "reward": "train a reward model",
         "grpo": "GRPO-family RL with a reward function", "ppo": "PPO with a value model and a reward function",
         "classify": "sequence classification on labelled text (prepare_data --stage classify)",
         "distill": "SFT distilled from a teacher ([sft_config.kd_config])"}


class ConfigFileError(ValueError):
    """A config file or override that cannot be used; the message names the file and the field."""


@dataclass(kw_only=True)
class RunConfig(ConfigMixin):
    """The ``[run]`` table: what a training command needs besides its TrainConfig."""

    reward: str | list[str] | None = None
    """RL (grpo, ppo): reward function(s) as ``"module:function"``; several are weighted by the stage config's
    reward_weights."""
    eval_prompts: list[str] = field(default_factory=list)
    """Prompts whose sample generations are logged at every evaluation."""
    callbacks: list[str | dict] = field(default_factory=list)
    """Callbacks: a built-in name ('early_stopping', 'tensorboard', 'wandb') or ``"module:Name"`` (a Callback
    class or a function returning one), alone or as a table ``{ type = "...", <keyword arguments> }``."""
    evaluators: list[str | dict] = field(default_factory=list)
    """Evaluators run at every evaluation: ``"module:function"`` (``fn(trainer) -> {metric: value}``), or a table
    ``{ type = "module:factory", <keyword arguments> }`` whose factory returns one."""


@dataclass
class MethodRun:
    """A validated config file: the command, its stage type, the TrainConfig and the ``[run]`` table."""

    method: str
    stage: str
    train_config: TrainConfig
    run: RunConfig
    source: Path

    def to_toml(self) -> str:
        """The resolved config as TOML (loadable by the same command)."""
        data = self.train_config.to_dict(toml=True)
        run = {k: v for k, v in self.run.to_dict().items() if v not in (None, [])}
        if run:
            data["run"] = run
        return dict_to_toml(data)


def _resolve_relative(data: dict[str, Any], slot: str, root: Path) -> None:
    """Relative paths of a config dict → under ``root`` (the pipeline's rules, plus ``output_dir``)."""
    if isinstance(data.get("output_dir"), str):
        data["output_dir"] = resolve_path(data["output_dir"], root)
    stage_config = data.get(slot)
    resolve_paths(data, stage_config if isinstance(stage_config, dict) else {}, root)


def load_method_config(method: str, path: str | Path, overrides: Sequence[str] = ()) -> MethodRun:
    """Read, override, resolve and validate the config of ``method``; raises :class:`ConfigFileError`."""
    if method not in METHODS:
        raise ConfigFileError(f"unknown method {method!r}; one of {list(METHODS)}")
    path = Path(path)
    if not path.is_file():
        raise ConfigFileError(f"{path}: no such config file")
    try:
        data = load_dict(path)
        override = parse_overrides(list(overrides))
    except Exception as e:  # noqa: BLE001 - TOML/JSON/YAML syntax, suffix, malformed overrides
        raise ConfigFileError(f"{path}: {e}") from e
    stage = METHODS[method]
    trainer_name, slot, _ = STAGES[stage]
    _resolve_relative(data, slot, path.resolve().parent)
    _resolve_relative(override, slot, Path.cwd())
    data = deep_merge(data, override)
    run = data.pop("run", {})
    data.setdefault("output_dir", str(Path.cwd() / "runs" / method))
    data.setdefault(slot, {})
    try:
        run_config = from_dict(RunConfig, run, "[run]")
        train_config = TrainConfig.from_dict(data)
        train_config.stage_config(slot, trainer_name)          # another stage's slot set: an error now, not later
    except (TypeError, ValueError) as e:
        raise ConfigFileError(f"{path}: {e}") from e
    _check_method(method, stage, slot, train_config, run_config, path)
    return MethodRun(method, stage, train_config, run_config, path)


def _check_method(method: str, stage: str, slot: str, cfg: TrainConfig, run: RunConfig, path: Path) -> None:
    if stage in RL_STAGES and not run.reward:
        raise ConfigFileError(f"{path}: [run].reward: {method} needs a reward function, e.g. "
                              f"reward = \"my_rewards:exact_match\"")
    if stage not in RL_STAGES and run.reward:
        raise ConfigFileError(f"{path}: [run].reward: only grpo and ppo use a reward function ({method} does not)")
    if method == "distill":
        kd = getattr(cfg, slot).kd_config
        if kd is None or kd.teacher_model_path is None:
            raise ConfigFileError(f"{path}: [{slot}.kd_config].teacher_model_path: distill needs a teacher model "
                                  f"folder (and optionally kd_coef, kind, temperature)")


def check_inputs(planned: MethodRun) -> None:
    """ConfigFileError listing every input path (data, tokenizer, initial/reference/value/teacher weights) that
    does not exist, before anything is built."""
    cfg, slot = planned.train_config, STAGES[planned.stage][1]
    if cfg.file_dataset is None:
        raise ConfigFileError(f"{planned.source}: file_dataset: not set ({planned.method} needs its training data)")
    missing = [f"{field.replace('train.', '').replace('config.', slot + '.', 1)}: {p} does not exist"
               for field, p in input_paths(cfg, slot) if not Path(p).exists()]
    if missing:
        raise ConfigFileError(f"{planned.source}: missing inputs (nothing has run):\n  " + "\n  ".join(missing))


def _entry(spec: Any, where: str, builtins: dict[str, Callable]) -> tuple[str, Callable, dict[str, Any]]:
    """A callback/evaluator entry → (name, the named object, keyword arguments)."""
    kwargs: dict[str, Any] = {}
    if isinstance(spec, dict):
        kwargs = dict(spec)
        spec = kwargs.pop("type", None)
        if not isinstance(spec, str):
            raise ConfigFileError(f"{where}: a table needs type = \"name\" or \"module:Name\"")
    if spec in builtins:
        return spec, builtins[spec], kwargs
    if ":" not in spec:
        known = f"a built-in ({', '.join(builtins)}) or " if builtins else ""
        raise ConfigFileError(f"{where}: {spec!r} is not {known}'module:Name'")
    return spec, import_callable(spec, where), kwargs


def _call(factory: Callable, kwargs: dict[str, Any], name: str, where: str) -> Any:
    try:
        return factory(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigFileError(f"{where}: {name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): {e}") from e


def build_callbacks(specs: list[str | dict], where: str = "[run].callbacks") -> list:
    """The Callback objects named by ``[run].callbacks`` (see :class:`RunConfig`)."""
    from ..trainers.callbacks import Callback
    from ..trainers.callbacks_builtin import BUILTIN_CALLBACKS
    out = []
    for i, spec in enumerate(specs):
        name, factory, kwargs = _entry(spec, f"{where}[{i}]", BUILTIN_CALLBACKS)
        callback = _call(factory, kwargs, name, f"{where}[{i}]")
        if not isinstance(callback, Callback):
            raise ConfigFileError(f"{where}[{i}]: {name} gave a {type(callback).__name__}, not an llm_trainer "
                                  f"Callback (subclass llm_trainer.trainers.callbacks.Callback)")
        out.append(callback)
    return out


def build_evaluators(specs: list[str | dict], where: str = "[run].evaluators") -> list[Callable]:
    """The evaluator functions named by ``[run].evaluators`` (see :class:`RunConfig`)."""
    out = []
    for i, spec in enumerate(specs):
        name, obj, kwargs = _entry(spec, f"{where}[{i}]", {})
        evaluator = _call(obj, kwargs, name, f"{where}[{i}]") if isinstance(spec, dict) else obj
        if not callable(evaluator):
            raise ConfigFileError(f"{where}[{i}]: {name} gave a {type(evaluator).__name__}, not a callable "
                                  f"evaluator(trainer) -> dict")
        out.append(evaluator)
    return out


def trainer_kwargs(planned: MethodRun) -> dict[str, Any]:
    """The trainer's keyword arguments: imports the reward functions, callbacks and evaluators (the config file's
    folder first on ``sys.path``)."""
    run = planned.run
    folder = str(planned.source.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        kwargs: dict[str, Any] = {"train_config": planned.train_config, "eval_prompts": run.eval_prompts,
                                  "callbacks": build_callbacks(run.callbacks),
                                  "evaluators": build_evaluators(run.evaluators)}
        if planned.stage in RL_STAGES:
            specs = [run.reward] if isinstance(run.reward, str) else list(run.reward)
            rewards = [import_callable(s, f"[run].reward[{i}]") for i, s in enumerate(specs)]
            kwargs["reward_func"] = rewards[0] if isinstance(run.reward, str) else rewards
    except ValueError as e:             # ConfigFileError, PipelineError (a failed import)
        raise ConfigFileError(f"{planned.source}: {e}") from e
    return kwargs


def run_method(method: str, config: str | Path, overrides: Sequence[str] = (), print_config: bool = False) -> int:
    """Train ``method`` from ``config`` (what the console command does); returns the exit status: 0, or 2 for a
    config error (printed by rank 0). ``print_config``: print the resolved config and return without training."""
    from ..parallel.env import read_env
    from ..trainers import trainer_class
    is_main = read_env().is_main
    try:
        planned = load_method_config(method, config, overrides)
        if print_config:
            if is_main:
                print(planned.to_toml(), end="", flush=True)
            return 0
        check_inputs(planned)
        kwargs = trainer_kwargs(planned)
    except ConfigFileError as e:
        if is_main:
            print(f"llm-trainer {method}: {e}", file=sys.stderr, flush=True)
        return 2
    trainer = trainer_class(planned.stage)(**kwargs)
    if trainer.backend.is_main:
        (trainer.output_dir / RESOLVED_CONFIG).write_text(planned.to_toml(), encoding="utf-8")
    trainer.train()
    trainer.backend.close()     # a process group left to interpreter exit sometimes aborts the process (gloo)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """One subcommand per method on the ``llm-trainer`` parser."""
    for method in METHODS:
        p = sub.add_parser(method, help=_HELP[method], description=(
            f"{_HELP[method]} from a config file: a TrainConfig table, [{STAGES[METHODS[method]][1]}] and [run] "
            f"(docs/cli.md). Relative paths in the file are relative to its folder; on the command line, to the "
            f"working directory."))
        p.add_argument("--config", "-c", required=True, help="config file (.toml, .json, .yaml)")
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved config (TOML) and exit without training")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="overrides, dotted for nested tables: optim_config.max_lr=3e-4 run.reward=mod:fn")
