"""Run under ``torchrun --nproc-per-node=2``: the evaluators of ``llm_trainer.evaluation`` and the
``ClassificationTrainer`` under DDP and DeepSpeed ZeRO-3 in one process group; rank 0 writes a JSON.

    torchrun --nproc-per-node=2 tests/dist_scripts/eval_parity.py OUT.json WORKDIR

WORKDIR is made by :func:`make_workdir` (tokenizer, an initial model, task files, classification data). Per scenario:
the evaluators' results on the initial model (called directly, on every rank), then ``CLS_STEPS`` classifier steps
(batch ``CLS_BATCH`` per rank) and its held-out metrics; the classifier exports to ``WORKDIR/<scenario>_clf/final``.
The test (tests/test_evaluation_distributed.py) compares everything with one process (classifier batch × 2).
"""
from __future__ import annotations

import json
import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from common import write_json  # noqa: E402

MC_ITEMS = [{"prompt": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1), str(abs(a - b))], "answer": 0}
            for a, b in ((3, 4), (5, 2), (1, 1), (6, 3), (2, 7))]
GEN_ITEMS = [{"prompt": f"{a}+{b}=?", "answer": str(a + b)} for a, b in ((3, 4), (5, 2), (1, 1), (6, 3), (2, 7))]
TEXTS = ["3+4=7 is true. great film.", "5+2=7", "bad film, 1+1=2 is true and 6+3=9 too.", "2+7=9"]
CLS_STEPS, CLS_BATCH = 3, 2


def make_workdir(work):
    """Tokenizer, initial model, pretraining tokens, task files and classify data in ``work`` (a Path)."""
    from llm_trainer.data.classify import prepare_classify
    from llm_trainer.model import LlmModel, ModelConfig
    from llm_trainer.tokenizer import train_tokenizer
    import torch
    from trainer_utils import write_pretrain_tokens
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(f"{a}+{b}={a + b} is true. great film, bad film." for a in range(10)
                                for b in range(10)))
    tok = train_tokenizer([corpus], 290, work / "tok", template="chatml", show_progress=False)
    torch.manual_seed(0)
    LlmModel(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(work / "init")
    write_pretrain_tokens(work / "tokens.npy", n=2000, seed=1)
    for name, rows in (("mc", MC_ITEMS), ("gen", GEN_ITEMS), ("texts", [{"text": t} for t in TEXTS])):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = [{"text": f"{a}+{b}={a + b + d}", "label": "true" if d == 0 else "false"}
            for a in range(6) for b in range(6) for d in (0, 1 if (a + b) % 2 else -1)]
    (work / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:48]))
    (work / "cls_held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[48:]))
    prepare_classify(tok, work / "cls.jsonl", work / "cls", progress=False)
    prepare_classify(tok, work / "cls_held.jsonl", work / "cls_held", labels=work / "cls", progress=False)
    return work


def evaluators(work):
    from llm_trainer.evaluation import GenerationTask, MultipleChoiceTask, PerplexityTask
    from llm_trainer.generation import GenerateConfig

    def reward(*, completions, answers, **_):
        return [len(c) / 10 + (c.strip()[:1] == a[:1]) for c, a in zip(completions, answers)]

    return [MultipleChoiceTask("mc", os.path.join(work, "mc.jsonl"), batch_size=2),
            MultipleChoiceTask("mc_chat", os.path.join(work, "mc.jsonl"), chat=True),
            PerplexityTask("ppl", os.path.join(work, "texts.jsonl"), max_length=8, batch_size=2),
            GenerationTask("gen", os.path.join(work, "gen.jsonl"), reward_fn=reward, batch_size=2,
                           generate_config=GenerateConfig(max_new_tokens=4, do_sample=False))]


def ds_config():
    from llm_trainer.parallel import DsConfig, DsZero3Config
    return DsConfig(zero_config=DsZero3Config(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=10_000,
                                              sub_group_size=100_000, reduce_bucket_size=50_000,
                                              allgather_bucket_size=50_000), steps_per_print=10**9)


def eval_trainer(work, name, ds):
    from llm_trainer import OptimConfig, TrainConfig, Trainer
    cfg = TrainConfig(init_weights_path=os.path.join(work, "init"), tokenizer=os.path.join(work, "tok"),
                      file_dataset=[os.path.join(work, "tokens.npy")], dataset_block_size=16, batch_size=2,
                      max_steps=1, output_dir=os.path.join(work, name), dtype="fp32", ds_config=ds,
                      save_interval=None, eval_interval=None, seed=0, optim_config=OptimConfig(initial_lr=1e-3))
    return Trainer(train_config=cfg)


def classifier(work, name, batch_size, ds):
    from llm_trainer import ClassificationTrainer, ClassifyConfig, OptimConfig, TrainConfig
    cfg = TrainConfig(init_weights_path=os.path.join(work, "init"), tokenizer=os.path.join(work, "tok"),
                      file_dataset=os.path.join(work, "cls"), eval_file_dataset=os.path.join(work, "cls_held"),
                      batch_size=batch_size, max_steps=CLS_STEPS, output_dir=os.path.join(work, name), dtype="fp32",
                      ds_config=ds, save_interval=None, eval_interval=None, log_interval=1, seed=5,
                      max_grad_norm=0.5, gradient_accumulation_steps=2,
                      classify_config=ClassifyConfig(class_weights=[1.5, 0.5]),
                      optim_config=OptimConfig(optim_type="adam", initial_lr=3e-3, weight_decay=0.1,
                                               enable_lr_scheduler=False))
    return ClassificationTrainer(train_config=cfg)


def run(work, name, ds, cls_batch) -> dict:
    """The evaluators on the initial model, then the classifier's training and held-out metrics."""
    tr = eval_trainer(work, name, ds)
    out = {"world": tr.backend.world_size, "backend": tr.backend.name}
    for ev in evaluators(work):
        out.update(ev(tr))
    clf = classifier(work, f"{name}_clf", cls_batch, ds)
    clf.train()
    out["classify"] = clf.classification_metrics()
    return out


def main(out: str, work: str) -> None:
    import torch.distributed as dist
    results = {}
    for name, ds in (("ddp", None), ("z3", ds_config())):
        try:
            results[name] = run(work, name, ds, CLS_BATCH)
        except Exception as e:  # noqa: BLE001 - reported to the test
            results[name] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"}
        if dist.is_initialized():
            dist.barrier()
    if int(os.environ["RANK"]) == 0:
        write_json(out, results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
