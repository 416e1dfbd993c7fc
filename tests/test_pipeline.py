"""``llm-trainer run pipeline.toml``: a pretrain → SFT pipeline on the quickstart's synthetic task, run through the
console entry point (``llm_trainer.cli.main.main``): per-stage folders, chaining, skipping finished stages, resuming
an interrupted stage from its checkpoint, and clear errors for a bad file."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from llm_trainer.cli.main import main
from llm_trainer.model import LlmModel

PRETRAIN_STEPS, SFT_STEPS, SAVE = 3, 4, 2

PIPELINE = """
output_dir = "runs"                      # relative paths: relative to this file's folder
tokenizer = "tokenizer"

[model]
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 2
num_key_value_heads = 1
max_position_embeddings = 128
vocab_size = {vocab}

[train]
batch_size = 4
dataset_block_size = 48
dtype = "fp32"
log_interval = 1
seed = 3
optim_config = {{ initial_lr = 2e-3, enable_lr_scheduler = false }}

[[stages]]
name = "base"
type = "pretrain"
train = {{ file_dataset = ["data/pretrain_tokens.npy"], max_steps = {pretrain_steps}, save_interval = {save} }}

[[stages]]
name = "chat"
type = "sft"
train = {{ file_dataset = ["data/sft_tokens"], max_steps = {sft_steps}, save_interval = {save} }}
config = {{ mask_prompt = true, gradient_accumulation_steps = 2 }}
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Synthetic task → tokenizer → prepared data, and a pipeline file next to them (paths relative to it)."""
    from llm_trainer.data.prepare import prepare
    from llm_trainer.quickstart.task import write_task_files
    from llm_trainer.tokenizer import Tokenizer, train_tokenizer
    root = tmp_path_factory.mktemp("pipeline")
    files = write_task_files(root / "data", seed=0, max_operand=9, pretrain_repeats=1)
    train_tokenizer([files["pretrain"], files["sft"]], vocab_size=320, output_dir=root / "tokenizer",
                    template="chatml", show_progress=False)
    tok = Tokenizer(root / "tokenizer")
    prepare("pretrain", tok, files["pretrain"], root / "data" / "pretrain_tokens", progress=False)
    prepare("sft", tok, files["sft"], root / "data" / "sft_tokens", progress=False)
    toml = root / "pipeline.toml"
    toml.write_text(PIPELINE.format(vocab=tok.vocab_size, pretrain_steps=PRETRAIN_STEPS, sft_steps=SFT_STEPS,
                                    save=SAVE))
    return root, toml


class Recorder:
    """Wraps the library's trainer classes (run_pipeline looks them up with ``llm_trainer.trainers.trainer_class``)
    to record what each constructed trainer started from: its init path, step after resume, and its initial weights."""

    def __init__(self, monkeypatch):
        import llm_trainer.trainers as trainers
        self.made: list[dict] = []
        real = trainers.trainer_class
        wrapped = {}
        monkeypatch.setattr(trainers, "trainer_class",
                            lambda stage: wrapped.setdefault(stage, self._wrap(real(stage))))

    def _wrap(self, base):
        rec = self

        class Recorded(base):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                rec.made.append({"stage": self.stage, "init": self.config.init_weights_path,
                                 "step": self.global_step, "output_dir": self.config.output_dir,
                                 "weights": {k: v.detach().clone()
                                             for k, v in self.backend.unwrap(self.model).state_dict().items()}})
        Recorded.__name__ = base.__name__
        return Recorded


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return LlmModel.from_pretrained(path).state_dict()


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pipeline_runs_chains_skips_and_resumes(workspace, monkeypatch, capsys, tmp_path):
    root, toml = workspace
    monkeypatch.chdir(tmp_path)                       # paths in the file resolve against its folder, not the cwd
    runs = root / "runs"

    # 1. both stages run; each exports final/ with DONE
    rec = Recorder(monkeypatch)
    assert main(["run", str(toml)]) == 0
    for stage in ("base", "chat"):
        assert (runs / stage / "final" / "DONE").is_file(), stage
        assert (runs / stage / "final" / "config.json").is_file(), stage
        assert (runs / stage / "final" / "tokenizer.json").is_file(), stage
    assert [m["stage"] for m in rec.made] == ["pretrain", "sft"]
    sft = rec.made[1]
    assert Path(sft["init"]) == runs / "base" / "final"
    assert _equal(sft["weights"], _weights(runs / "base" / "final"))    # SFT started from the pretrain export
    assert not _equal(_weights(runs / "chat" / "final"), sft["weights"])  # …and trained
    chat_final = _weights(runs / "chat" / "final")

    # 2. rerunning skips finished stages: no trainer is even built
    rec.made.clear()
    capsys.readouterr()
    assert main(["run", str(toml)]) == 0
    out = capsys.readouterr().out
    assert rec.made == []
    assert out.count("done already") == 2, out

    # 3. an interrupted SFT stage (its last checkpoint and export gone, as after a kill between the step-SAVE
    #    checkpoint and the end) resumes from its latest checkpoint and reaches the same weights
    checkpoints = sorted((runs / "chat").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in checkpoints] == [f"checkpoint-{SAVE}", f"checkpoint-{SFT_STEPS}"]
    shutil.rmtree(runs / "chat" / "final")
    shutil.rmtree(checkpoints[-1])
    assert main(["run", str(toml)]) == 0
    assert [(m["stage"], m["step"]) for m in rec.made] == [("sft", SAVE)]   # pretrain skipped, SFT resumed
    assert (runs / "chat" / "final" / "DONE").is_file()
    assert _equal(_weights(runs / "chat" / "final"), chat_final)           # resume is exact (CPU, one process)

    # 4. killed after the export but before DONE: the stage resumes at its last step, trains nothing, re-exports
    rec.made.clear()
    (runs / "chat" / "final" / "DONE").unlink()
    assert main(["run", str(toml)]) == 0
    assert [(m["stage"], m["step"]) for m in rec.made] == [("sft", SFT_STEPS)]
    assert (runs / "chat" / "final" / "DONE").is_file()
    assert _equal(_weights(runs / "chat" / "final"), chat_final)

    # 5. --only runs just the named stage (here: done already, so nothing is built)
    rec.made.clear()
    assert main(["run", str(toml), "--only", "chat"]) == 0
    assert rec.made == []


@pytest.mark.parametrize("stages,message", [
    ('[[stages]]\nname = "warmup"\ntype = "pretrain"\n\n[[stages]]\nname = "polish"\ntype = "finetune"\n',
     "polish"),
    ('[[stages]]\nname = "a"\ntype = "sft"\n[[stages]]\nname = "a"\ntype = "sft"\n', "used twice"),
    ('[[stages]]\nname = "rl"\ntype = "grpo"\n', "reward"),
    ('[[stages]]\nname = "odd"\ntype = "sft"\ntrain = { batch_sise = 4 }\n', "batch_sise"),
    ('output_dir = "x"\n', "stages"),
    ('[trian]\nbatch_size = 4\n[[stages]]\nname = "a"\ntype = "sft"\n',
     "pipeline: unknown key 'trian'; did you mean 'train'?"),
    ('[[stages]]\nname = "a"\ntype = "sft"\ntrian = { batch_size = 4 }\n',
     "stages[0] ('a'): unknown key 'trian'; did you mean 'train'?"),
    ('[[stages]]\nname = "a"\ntpye = "sft"\n', "unknown key 'tpye'; did you mean 'type'?"),
    ('[[stages]]\nname = "a"\ntype = "sft"\nconfig = { mask_promt = true }\n', "did you mean mask_prompt?"),
    ('[model]\nhiden_size = 32\n[[stages]]\nname = "a"\ntype = "sft"\n', "did you mean hidden_size?"),
    ('[train]\noutput_dir = "elsewhere"\n[[stages]]\nname = "a"\ntype = "sft"\n', "top-level output_dir"),
    ('train = 3\n[[stages]]\nname = "a"\ntype = "sft"\n', "train must be a table"),
])
def test_bad_pipeline_exits_2_naming_the_stage(tmp_path, capsys, stages, message):
    toml = tmp_path / "bad.toml"
    toml.write_text(stages)
    assert main(["run", str(toml)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("llm-trainer run:"), err
    assert not (tmp_path / "runs").exists()          # validated before anything runs


def test_missing_pipeline_file_exits_2(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml" in capsys.readouterr().err


def test_only_with_an_unknown_stage_exits_2_before_training(tmp_path, capsys):
    toml = tmp_path / "p.toml"
    toml.write_text('[[stages]]\nname = "base"\ntype = "pretrain"\n')
    assert main(["run", str(toml), "--only", "bsae"]) == 2
    assert "bsae" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_stage_whose_predecessor_has_not_finished_is_refused(tmp_path, capsys):
    (tmp_path / "d.npy").write_bytes(b"")
    toml = tmp_path / "p.toml"
    toml.write_text('[train]\nfile_dataset = ["d.npy"]\n[[stages]]\nname = "base"\ntype = "pretrain"\n'
                    '[[stages]]\nname = "chat"\ntype = "sft"\n')
    assert main(["run", str(toml), "--only", "chat"]) == 2
    err = capsys.readouterr().err
    assert "'chat'" in err and "'base'" in err and "has not finished" in err


CHAIN = """
output_dir = "runs"
tokenizer = "tok"

[[stages]]
name = "base"
type = "pretrain"
train = {{ file_dataset = ["data/base.npy"] }}

[[stages]]
name = "chat"
type = "sft"
train = {{ file_dataset = ["data/chat", "data/chat2"], eval_file_dataset = "data/chat_eval" }}

[[stages]]
name = "rm"
type = "reward"
train = {{ file_dataset = ["data/pairs"], init_weights_path = "{rm_init}" }}

[[stages]]
name = "rl"
type = "ppo"
train = {{ file_dataset = ["data/prompts"] }}
config = {{ value_model_weights_path = "{value}", ref_model_weights_path = "refs/ref" }}
reward = "os.path:exists"
"""


def _chain(tmp_path, rm_init="runs/base/final", value="runs/rm/final", present=("data/chat2",)):
    """A four-stage pipeline file whose inputs exist except those not named in ``present`` (+ the base data)."""
    for rel in ("data/base.npy", "data/chat", "data/chat2", "data/chat_eval", "data/pairs", "data/prompts", "tok",
                "refs/ref"):
        if rel in present or rel in ("data/base.npy",):
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).write_text("x")
    toml = tmp_path / "p.toml"
    toml.write_text(CHAIN.format(rm_init=rm_init, value=value))
    return toml


def test_every_missing_input_is_reported_before_the_first_stage_trains(tmp_path, capsys):
    """Stage 1's data is there; later stages' data, the tokenizer and a reference model are not: nothing runs and
    the error lists each missing path with its stage and field."""
    toml = _chain(tmp_path, present=("data/chat2",))
    assert main(["run", str(toml)]) == 2
    err = capsys.readouterr().err
    assert "nothing has run" in err
    for line in ("stages[0] ('base').train.tokenizer: {t}/tok does not exist",
                 "stages[1] ('chat').train.file_dataset: {t}/data/chat does not exist",
                 "stages[1] ('chat').train.eval_file_dataset: {t}/data/chat_eval does not exist",
                 "stages[2] ('rm').train.file_dataset: {t}/data/pairs does not exist",
                 "stages[3] ('rl').train.file_dataset: {t}/data/prompts does not exist",
                 "stages[3] ('rl').config.ref_model_weights_path: {t}/refs/ref does not exist"):
        assert line.format(t=tmp_path) in err, (line, err)
    assert "data/chat2" not in err and "runs/base/final" not in err and "runs/rm/final" not in err
    assert err.count("/tok does not exist") == 1                 # a path shared by every stage: reported once
    assert not (tmp_path / "runs").exists()


def test_paths_written_by_earlier_stages_are_not_required_but_later_ones_are_refused(tmp_path):
    from llm_trainer.pipeline import PipelineError, check_inputs, load_pipeline, plan

    everything = ("data/chat", "data/chat2", "data/chat_eval", "data/pairs", "data/prompts", "tok", "refs/ref")
    stages = plan(load_pipeline(_chain(tmp_path, present=everything)), tmp_path)
    check_inputs(stages, {st["name"] for st in stages})           # runs/base/final, runs/rm/final: earlier stages
    assert stages[3]["kwargs"]["train_config"].ppo_config.ref_model_weights_path == str(tmp_path / "refs" / "ref")
    stages = plan(load_pipeline(_chain(tmp_path, rm_init="runs/rl/final", present=everything)), tmp_path)
    with pytest.raises(PipelineError, match=r"stages\[2\] \('rm'\)\.train\.init_weights_path: .*runs/rl/final is "
                                            r"written by the stage 'rl', which runs later"):
        check_inputs(stages, {st["name"] for st in stages})
    check_inputs(stages, {"base", "chat"})                        # only the stages about to run are checked


def test_the_documented_example_is_valid(tmp_path, monkeypatch):
    """docs/pipeline.md's full example (and its rewards.py) pass every check once its inputs exist."""
    from llm_trainer.pipeline import check_inputs, import_callable, load_pipeline, plan

    doc = (Path(__file__).resolve().parents[1] / "docs" / "pipeline.md").read_text()
    example = doc.split("## Full example", 1)[1]
    toml = example.split("```toml\n", 1)[1].split("```", 1)[0]
    rewards = example.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "pipeline.toml").write_text(toml)
    (tmp_path / "rewards.py").write_text(rewards)
    for rel in ("tokenizer", "data/web.npy", "data/books.npy", "data/sft", "data/sft_eval", "data/pairs",
                "data/questions"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    stages = plan(load_pipeline(tmp_path / "pipeline.toml"), tmp_path)
    assert [(st["name"], st["type"]) for st in stages] == [("base", "pretrain"), ("chat", "sft"), ("prefs", "dpo"),
                                                          ("rl", "grpo")]
    check_inputs(stages, {st["name"] for st in stages})
    chat = stages[1]["kwargs"]["train_config"]
    assert chat.optim_config.initial_lr == 1e-4 and chat.optim_config.warmup_iters == 200   # merged over [train]
    assert chat.init_weights_path == str(tmp_path / "runs" / "tiny_chat" / "base" / "final")
    assert chat.sft_config.mask_prompt and stages[0]["kwargs"]["train_config"].pretrain_config.packing
    monkeypatch.syspath_prepend(str(tmp_path))                   # as run_pipeline does with the file's folder
    monkeypatch.delitem(sys.modules, "rewards", raising=False)
    fn = import_callable(stages[3]["kwargs"]["reward_func"], "rl.reward")
    assert fn(completions=[" 19", "7"], answers=["19", None]) == [1.0, 0.0]


def test_a_reward_module_beside_a_later_config_is_not_shadowed_by_an_earlier_one(tmp_path, monkeypatch):
    from llm_trainer.pipeline import import_callable
    for name, fn in (("a", "first"), ("b", "second")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "shadow_rewards.py").write_text(f"def {fn}(completions):\n    return [0.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path / "a"))
    assert import_callable("shadow_rewards:first", "run a").__name__ == "first"
    monkeypatch.syspath_prepend(str(tmp_path / "b"))                  # a second config, in another folder
    assert import_callable("shadow_rewards:second", "run b").__name__ == "second"
    monkeypatch.delitem(sys.modules, "shadow_rewards")
