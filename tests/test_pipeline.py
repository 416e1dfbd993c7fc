"""``llm-trainer run pipeline.toml``: a pretrain → SFT pipeline on the quickstart's synthetic task, run through the
console entry point (``llm_trainer.cli.main.main``): per-stage folders, chaining, skipping finished stages, resuming
an interrupted stage from its checkpoint, and clear errors for a bad file."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import llm_trainer
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
    """Wraps the library's trainer classes (run_pipeline looks them up on ``llm_trainer``) to record what each
    constructed trainer started from: its init path, step after resume, and its initial weights."""

    def __init__(self, monkeypatch):
        self.made: list[dict] = []
        for name in ("Trainer", "SFTTrainer"):
            base = getattr(llm_trainer, name)
            monkeypatch.setattr(llm_trainer, name, self._wrap(base))

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
    toml = tmp_path / "p.toml"
    toml.write_text('[[stages]]\nname = "base"\ntype = "pretrain"\n[[stages]]\nname = "chat"\ntype = "sft"\n')
    assert main(["run", str(toml), "--only", "chat"]) == 2
    err = capsys.readouterr().err
    assert "'chat'" in err and "'base'" in err and "has not finished" in err
