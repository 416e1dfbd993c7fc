"""Write the data the example configs train on, next to them (or into the folder given):

    python example/configs/make_data.py            # then e.g.: llm-trainer sft --config example/configs/sft.toml

The quickstart's synthetic ``a+b`` task (``llm_trainer.quickstart.task``) as jsonl, a byte-level BPE tokenizer
(``tokenizer/``), the prepared token files of every method (``data/pretrain.npy``, ``data/sft``, ``data/dpo``,
``data/reward``, ``data/rl``) and, for ``distill.toml``, a stand-in teacher (``teacher/``: a small model with random
weights and the same vocabulary — point ``teacher_model_path`` at a real one, e.g. the ``final/`` of an SFT run).
"""
from __future__ import annotations

import sys
from pathlib import Path

from llm_trainer.data import prepare_data
from llm_trainer.model import LlmModel, ModelConfig
from llm_trainer.quickstart.task import write_task_files
from llm_trainer.tokenizer import train_tokenizer

VOCAB_SIZE = 320          # the configs' model_config.vocab_size


def make_data(folder: str | Path, seed: int = 0) -> Path:
    """Write tokenizer/, data/ and teacher/ into ``folder``; returns it."""
    folder = Path(folder)
    files = write_task_files(folder / "data" / "jsonl", seed=seed, max_operand=9, pretrain_repeats=4)
    tokenizer = train_tokenizer([files["pretrain"], files["sft"]], vocab_size=VOCAB_SIZE,
                                output_dir=folder / "tokenizer", template="chatml", show_progress=False)
    for stage, source in (("pretrain", "pretrain"), ("sft", "sft"), ("dpo", "dpo"), ("reward", "dpo"), ("rl", "rl")):
        prepare_data(stage, tokenizer, files[source], folder / "data" / stage, progress=False)
    teacher = LlmModel(ModelConfig(vocab_size=VOCAB_SIZE, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    teacher.save_pretrained(folder / "teacher")
    return folder


if __name__ == "__main__":
    print(make_data(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent))
