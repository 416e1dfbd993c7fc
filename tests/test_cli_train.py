"""``llm-trainer <method> --config FILE [key=value ...]``: every example config in ``example/configs/`` trains (on
data written by its ``make_data.py`` next to a copy of the configs), the resolved config is written and reads back
to the same config, overrides and ``--print-config``, path resolution, YAML, every kind of error, callbacks and
evaluators named in a file, and a real 2-rank ``ddp_train`` run of a config file in which EarlyStopping on rank 0
stops both ranks at the same step."""
from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from llm_trainer.cli.main import main
from llm_trainer.cli.train_cmd import load_method_config
from llm_trainer.metrics import read_metrics

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_scripts"))
from runner import ROOT, subprocess_env  # noqa: E402

EXAMPLES = Path(ROOT) / "example" / "configs"
METHODS = ("pretrain", "sft", "dpo", "reward", "grpo", "ppo", "distill")
SIGNATURE = {"pretrain": "lm_loss", "sft": "eval_loss", "dpo": "rewards/margin", "reward": "rewards/accuracy",
             "grpo": "reward/short/mean", "ppo": "value_loss", "distill": "kd_loss"}
"""A metric only that method logs (grpo: its second reward function, so both were imported)."""

HOOKS = '''
import json
from llm_trainer.trainers.callbacks import Callback


class Record(Callback):
    """Every rank appends its events to output_dir/events_rank<r>.jsonl."""
    main_process_only = False

    def _write(self, trainer, event):
        with open(trainer.output_dir / f"events_rank{trainer.backend.rank}.jsonl", "a") as f:
            f.write(json.dumps(event) + "\\n")

    def on_step_end(self, trainer, control, stats):
        self._write(trainer, ["step", trainer.global_step])

    def on_train_end(self, trainer, control, results):
        self._write(trainer, ["end", trainer.global_step])


def score(trainer):
    """Improves until step 2, then stays flat: EarlyStopping(patience=2) stops at step 4."""
    return {"score": 1.0 / min(trainer.global_step, 2)}


def not_a_callback():
    return 42
'''
HOOK_OVERRIDES = ['run.callbacks=["hooks_for_tests:Record", '
                  '{type = "early_stopping", metric = "score", patience = 2}]',
                  'run.evaluators=["hooks_for_tests:score"]', "eval_interval=1", "max_steps=8", "batch_size=4"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A copy of example/configs with the data its make_data.py writes next to it, and a hooks module."""
    root = tmp_path_factory.mktemp("configs")
    for f in EXAMPLES.iterdir():
        if f.suffix in (".toml", ".py"):
            shutil.copy(f, root)
    runpy.run_path(str(root / "make_data.py"))["make_data"](root)
    (root / "hooks_for_tests.py").write_text(HOOKS)
    (root / "minimal.toml").write_text("batch_size = 2\n")
    return root


def test_every_example_has_a_test():
    assert sorted(p.stem for p in EXAMPLES.glob("*.toml")) == sorted(METHODS)   # one file per method


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_from_its_example_config(workspace, tmp_path, monkeypatch, method):
    monkeypatch.chdir(tmp_path)                 # paths in the file resolve next to it; output_dir → ./runs/<method>
    assert main([method, "--config", str(workspace / f"{method}.toml")]) == 0
    out = tmp_path / "runs" / method
    assert (out / "final" / "config.json").is_file() and (out / "final" / "tokenizer.json").is_file()
    planned = load_method_config(method, workspace / f"{method}.toml")
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == list(range(1, planned.train_config.max_steps + 1))
    assert any(SIGNATURE[method] in r for r in read_metrics(out))
    saved = load_method_config(method, out / "config.toml")          # the resolved config reads back the same
    assert (saved.train_config, saved.run) == (planned.train_config, planned.run)
    assert saved.train_config.tokenizer == str(workspace / "tokenizer")
    if method == "sft":
        samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        assert {s["prompt"] for s in samples} == {"3+4=?"}
    if method == "reward":
        from llm_trainer import RewardModel
        assert RewardModel.from_pretrained(out / "final") is not None


def test_print_config_applies_overrides_and_resolves_paths(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    overrides = ["optim_config.max_lr=1e-3", "grpo_config.group_size=8", "run.reward=rewards:short",
                 'file_dataset=["mine/rl"]', "grpo_config.generate_config.max_new_tokens=6", "report_to=tensorboard",
                 'run_name="2024"', "output_dir=elsewhere", "save_interval=none", "ds_config=none"]
    assert main(["grpo", "--config", str(workspace / "grpo.toml"), "--print-config", *overrides]) == 0
    printed = capsys.readouterr().out
    d = tomllib.loads(printed)
    assert d["optim_config"]["max_lr"] == 1e-3 and d["optim_config"]["initial_lr"] == 5e-4     # merged, not replaced
    assert d["grpo_config"]["group_size"] == 8 and d["grpo_config"]["loss_beta"] == 0.0
    assert d["grpo_config"]["generate_config"] == {**d["grpo_config"]["generate_config"], "max_new_tokens": 6,
                                                   "temperature": 1.0}
    assert d["run"] == {"reward": "rewards:short"}
    assert d["report_to"] == ["tensorboard"] and d["run_name"] == "2024"
    assert d["file_dataset"] == [str(tmp_path / "mine" / "rl")]          # command-line paths: the working directory
    assert d["output_dir"] == str(tmp_path / "elsewhere")
    assert d["tokenizer"] == str(workspace / "tokenizer")                # file paths: the file's folder
    assert "sft_config" not in d and "pretrain_config" not in d
    assert d["save_interval"] == "none" and d["ds_config"] == "none"       # None, where the default is not None
    assert not (tmp_path / "elsewhere").exists()                         # nothing ran
    (tmp_path / "printed.toml").write_text(printed)
    again = load_method_config("grpo", tmp_path / "printed.toml")
    direct = load_method_config("grpo", workspace / "grpo.toml", overrides)
    assert (again.train_config, again.run) == (direct.train_config, direct.run)
    assert again.train_config.save_interval is None and again.train_config.ds_config is None


def test_yaml_config_equals_the_toml_one(workspace, tmp_path, monkeypatch):
    yaml = pytest.importorskip("yaml", reason="YAML configs need the optional pyyaml")
    monkeypatch.chdir(tmp_path)
    data = tomllib.loads((workspace / "grpo.toml").read_text())
    (workspace / "grpo_as.yaml").write_text(yaml.safe_dump(data))
    from_yaml = load_method_config("grpo", workspace / "grpo_as.yaml", ["grpo_config.group_size=2"])
    from_toml = load_method_config("grpo", workspace / "grpo.toml", ["grpo_config.group_size=2"])
    assert (from_yaml.train_config, from_yaml.run) == (from_toml.train_config, from_toml.run)


@pytest.mark.parametrize("method, config, overrides, message", [
    ("sft", "sft.toml", ["bach_size=4"], r"TrainConfig: unknown field 'bach_size'; did you mean batch_size"),
    ("sft", "sft.toml", ["optim_config.inital_lr=1e-3"], r"unknown field 'inital_lr'; did you mean initial_lr"),
    ("sft", "sft.toml", ['batch_size="x"'], r"TrainConfig\.batch_size: expected int, got 'x' \(str\)"),
    ("sft", "sft.toml", ["optim_config.max_lr=abc"],
     r"TrainConfig\.optim_config\.max_lr: expected float \| None, got 'abc' \(str\)"),
    ("grpo", "grpo.toml", ["grpo_config.group_size=many"], r"TrainConfig\.grpo_config\.group_size: expected int"),
    ("sft", "sft.toml", ["sft_config.mask_prompt=yes"], r"TrainConfig\.sft_config\.mask_prompt: expected bool"),
    ("sft", "sft.toml", ["optim_config=3"], r"TrainConfig\.optim_config: expected OptimConfig, got 3"),
    ("sft", "sft.toml", ["batch_size=none"], r"TrainConfig\.batch_size: expected int, got 'none' \(str\)"),
    ("sft", "sft.toml", ["batch_size=0"], r"TrainConfig\.batch_size must be an int >= 1, got 0"),
    ("sft", "sft.toml", ['run.eval_prompt=["x"]'], r"\[run\] \(RunConfig\): unknown field 'eval_prompt'; did you "
                                                   r"mean eval_prompts"),
    ("sft", "sft.toml", ["run.eval_prompts=7"], r"\[run\]\.eval_prompts: expected list\[str\]"),
    ("sft", "sft.toml", ["dpo_config.loss_beta=0.2"], r"dpo_config.*SFTTrainer reads only TrainConfig\.sft_config"),
    ("grpo", "grpo.toml", ["run.reward=rewards:nope"], r"\[run\]\.reward\[0\]: cannot import 'rewards:nope'"),
    ("grpo", "grpo.toml", ["run.reward=exact_match"], r"expected 'module:function', got 'exact_match'"),
    ("ppo", "minimal.toml", [], r"\[run\]\.reward: ppo needs a reward function"),
    ("dpo", "dpo.toml", ["run.reward=rewards:exact_match"], r"only grpo and ppo use a reward function"),
    ("distill", "sft.toml", [], r"\[sft_config\.kd_config\]\.teacher_model_path: distill needs a teacher"),
    ("sft", "sft.toml", ["batch_size"], r"override 'batch_size': expected key=value"),
    ("sft", "sft.toml", ["optim_config=1", "optim_config.max_lr=1"], r"optim_config is set to a value, not a table"),
    ("sft", "sft.toml", ['run.callbacks=["nope"]'],
     r"\[run\]\.callbacks\[0\]: 'nope' is not a built-in \(early_stopping, tensorboard, wandb\) or 'module:Name'"),
    ("sft", "sft.toml", ['run.callbacks=[{type = "early_stopping", patience = 0}]'],
     r"\[run\]\.callbacks\[0\]: early_stopping\(patience=0\): EarlyStopping\.patience must be an int >= 1"),
    ("sft", "sft.toml", ['run.callbacks=[{patience = 1}]'], r"\[run\]\.callbacks\[0\]: a table needs type ="),
    ("sft", "sft.toml", ['run.callbacks=["hooks_for_tests:not_a_callback"]'],
     r"hooks_for_tests:not_a_callback gave a int, not an llm_trainer Callback"),
    ("sft", "sft.toml", ['run.evaluators=["hooks_for_tests:missing"]'], r"cannot import 'hooks_for_tests:missing'"),
    ("sft", "missing.toml", [], r"missing\.toml: no such config file"),
    ("sft", "minimal.toml", [], r"file_dataset: not set \(sft needs its training data\)"),
    ("distill", "distill.toml", ['file_dataset=["nope"]', "sft_config.kd_config.teacher_model_path=nope2",
                                 "tokenizer=tok"],
     r"missing inputs \(nothing has run\):\n  tokenizer: .*/tok does not exist\n  file_dataset: .*/nope does not "
     r"exist\n  sft_config\.kd_config\.teacher_model_path: .*/nope2 does not exist\n$"),
])
def test_config_errors_name_the_file_and_field(workspace, tmp_path, monkeypatch, capsys, method, config, overrides,
                                               message):
    monkeypatch.chdir(tmp_path)
    path = workspace / config
    assert main([method, "--config", str(path), f"output_dir={tmp_path / 'out'}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"llm-trainer {method}: {path}: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()                              # nothing was built


def test_a_broken_file_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("batch_size = \n")
    assert main(["sft", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Invalid value" in err
    (tmp_path / "bad.ini").write_text("")
    assert main(["sft", "--config", str(tmp_path / "bad.ini")]) == 2
    assert "must end in .toml, .json, .yaml or .yml" in capsys.readouterr().err


def test_callbacks_and_evaluators_named_in_the_config(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--config", str(workspace / "pretrain.toml"), *HOOK_OVERRIDES]) == 0
    out = tmp_path / "runs" / "pretrain"
    events = [json.loads(line) for line in (out / "events_rank0.jsonl").read_text().splitlines()]
    assert events == [["step", 1], ["step", 2], ["step", 3], ["step", 4], ["end", 4]]    # stopped early at step 4
    assert [(r["step"], r["score"]) for r in read_metrics(out) if "score" in r] == [(1, 1.0), (2, 0.5), (3, 0.5),
                                                                                   (4, 0.5)]


@pytest.mark.distributed
def test_ddp_train_runs_a_config_file(workspace, tmp_path):
    """``ddp_train --nproc 2 -m llm_trainer.cli.main pretrain --config ...``: both ranks train, EarlyStopping (main
    rank only) stops both at step 4, TensorBoard is written once, config.toml once."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-c", "from llm_trainer.cli.launch import ddp_train; ddp_train()", "--nproc", "2",
           "-m", "llm_trainer.cli.main", "pretrain", "--config", str(workspace / "pretrain.toml"),
           f"output_dir={out}", "report_to=tensorboard", *HOOK_OVERRIDES]
    p = subprocess.run(cmd, env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "running on 2 ranks (backend ddp/gloo" in p.stdout + p.stderr
    for rank in (0, 1):
        events = [json.loads(line) for line in (out / f"events_rank{rank}.jsonl").read_text().splitlines()]
        assert events == [["step", 1], ["step", 2], ["step", 3], ["step", 4], ["end", 4]], rank
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    saved = load_method_config("pretrain", out / "config.toml")
    assert saved.train_config.output_dir == str(out) and saved.train_config.report_to == ["tensorboard"]
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.distributed
@pytest.mark.slow
def test_ds_train_runs_the_console_script_with_a_config_file(workspace, tmp_path):
    """``ds_train --nproc 2 $(which llm-trainer) dpo --config ...``: the console script as the launched script,
    under DeepSpeed's launcher (ZeRO-3, TrainConfig's default ds_config) on 2 CPU ranks."""
    script = shutil.which("llm-trainer", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the llm-trainer console script is not installed next to this interpreter")
    out = tmp_path / "ds"
    cmd = [sys.executable, "-c", "from llm_trainer.cli.launch import ds_train; ds_train()", "--nproc", "2", script,
           "dpo", "--config", str(workspace / "dpo.toml"), f"output_dir={out}", "max_steps=2"]
    p = subprocess.run(cmd, env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "running on 2 ranks (backend deepspeed" in p.stdout + p.stderr
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2]
    assert load_method_config("dpo", out / "config.toml").train_config.max_steps == 2
    assert (out / "final" / "model.safetensors").is_file()
