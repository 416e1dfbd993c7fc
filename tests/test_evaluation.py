"""Evaluators (llm_trainer.evaluation) against independent computations — log-likelihoods from the model's full logits
one sequence at a time, greedy generation one prompt at a time — and inside the training loop (metrics.jsonl, the
printed eval line, the PNG panels). The 2-rank runs are in test_evaluation_distributed.py."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_trainer import ModelConfig, OptimConfig, TrainConfig, Trainer
from llm_trainer.data.formats import DataError
from llm_trainer.evaluation import (EXTRACTORS, GenerationTask, MultipleChoiceTask, PerplexityTask, loglikelihoods,
                                    normalize_answer)
from llm_trainer.generation import GenerateConfig, generate
from llm_trainer.model import LlmModel

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "dist_scripts"))
from eval_parity import MC_ITEMS, GEN_ITEMS, TEXTS, make_workdir  # noqa: E402


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("evalwork"))


def trainer(work, tmp_path, evaluators=(), **kw):
    args = dict(init_weights_path=str(work / "init"), tokenizer=str(work / "tok"),
                file_dataset=[str(work / "tokens.npy")], dataset_block_size=24, batch_size=3, max_steps=2,
                output_dir=str(tmp_path / "run"), dtype="fp32", ds_config=None, save_interval=None,
                eval_interval=None, log_interval=1, seed=0, optim_config=OptimConfig(initial_lr=1e-3))
    args.update(kw)
    return Trainer(train_config=TrainConfig(**args), evaluators=list(evaluators))


def by_hand_logprob(model, ids, n):
    """Sum of log p(last n tokens | the ones before) from the full logits of one unpadded sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return sum(float(lp[t - 1, ids[t]]) for t in range(len(ids) - n, len(ids)))


@pytest.mark.parametrize("chat", [False, True])
def test_multiple_choice_equals_log_likelihoods_by_hand(work, tmp_path, chat):
    tr = trainer(work, tmp_path)
    tok, model = tr.tokenizer, LlmModel.from_pretrained(work / "init")
    task = MultipleChoiceTask("mc", work / "mc.jsonl", chat=chat)
    acc = acc_norm = 0
    want_ll = []
    for it in MC_ITEMS:
        if chat:
            ctx = tok.apply_chat_template([{"role": "user", "content": it["prompt"]}],
                                          add_generation_prompt=True).input_ids
        else:
            ctx = tok.encode(it["prompt"])
        lls = []
        for c in it["choices"]:
            if chat:
                cont = tok.encode(c)
            else:
                whole = tok.encode(it["prompt"] + " " + c)
                assert whole[:len(ctx)] == ctx
                cont = whole[len(ctx):]
            lls.append(by_hand_logprob(model, list(ctx) + cont, len(cont)))
        want_ll += lls
        acc += int(np.argmax(lls)) == it["answer"]
        acc_norm += int(np.argmax([ll / len(c) for ll, c in zip(lls, it["choices"])])) == it["answer"]
    got_ll = loglikelihoods(tr, task.requests(tok), batch_size=3)
    np.testing.assert_allclose(got_ll.numpy(), want_ll, rtol=1e-5, atol=1e-5)
    out = task(tr)
    assert out == {"eval/mc/acc": pytest.approx(acc / len(MC_ITEMS)),
                   "eval/mc/acc_norm": pytest.approx(acc_norm / len(MC_ITEMS))}


def test_perplexity_windows_predict_every_token_once(work, tmp_path):
    tr = trainer(work, tmp_path)
    tok, model = tr.tokenizer, LlmModel.from_pretrained(work / "init")
    L = 8
    out = PerplexityTask("ppl", work / "texts.jsonl", max_length=L)(tr)
    nll, n, n_bytes = 0.0, 0, 0
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    for text in TEXTS:
        ids = tok.encode(text)
        n_bytes += len(text.encode())
        done = 0
        while done < len(ids):                       # a window: the token before + up to L new tokens
            prev = start if done == 0 else ids[done - 1]
            chunk = ids[done:done + L]
            nll -= by_hand_logprob(model, [prev] + chunk, len(chunk))
            n += len(chunk)
            done += len(chunk)
    assert n == sum(len(tok.encode(t)) for t in TEXTS)
    assert out["eval/ppl/nll"] == pytest.approx(nll / n, rel=1e-6)
    assert out["eval/ppl/ppl"] == pytest.approx(math.exp(nll / n), rel=1e-6)
    assert out["eval/ppl/bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-6)


def test_generation_exact_match_and_reward_equal_one_prompt_at_a_time(work, tmp_path):
    tr = trainer(work, tmp_path)
    tok, model = tr.tokenizer, LlmModel.from_pretrained(work / "init")
    cfg = GenerateConfig(max_new_tokens=5, do_sample=False)
    seen = []

    def reward(*, completions, answers, **_):
        seen.extend(completions)
        return [float(len(c)) + (a == "7") for c, a in zip(completions, answers)]

    task = GenerationTask("gen", work / "gen.jsonl", generate_config=cfg, reward_fn=reward, extract="first_line",
                          log_samples=2)
    out = task(tr)
    em, rw, lengths = [], [], []
    for it in GEN_ITEMS:
        prompt = tok.apply_chat_template([{"role": "user", "content": it["prompt"]}],
                                         add_generation_prompt=True).input_ids
        res = generate(model, [prompt], cfg, eos_token_ids=tr.stop_token_ids(), pad_token_id=tr.pad_token_id())
        text = tok.decode(res.completions[0])
        first = text.strip().split("\n")[0].strip()
        em.append(float(bool(first) and normalize_answer(first) == normalize_answer(it["answer"])))
        rw.append(len(text) + (str(it["answer"]) == "7"))
        lengths.append(len(res.completions[0]))
    assert len(seen) == len(GEN_ITEMS)
    assert out["eval/gen/exact_match"] == pytest.approx(np.mean(em))
    assert out["eval/gen/reward"] == pytest.approx(np.mean(rw))
    assert out["eval/gen/completion_tokens"] == pytest.approx(np.mean(lengths))
    samples = [json.loads(x) for x in (tmp_path / "run" / "eval_gen.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == [it["prompt"] for it in GEN_ITEMS[:2]]


def test_answer_extraction_and_normalisation():
    assert EXTRACTORS["last_number"]("so 3 + 4 = 7.") == "7"
    assert EXTRACTORS["gsm8k"]("... 12 apples #### 1,234") == "1,234"
    assert EXTRACTORS["gsm8k"]("the answer is 41 or 42") == "42"
    assert EXTRACTORS["first_number"]("no") is None
    assert normalize_answer("1,234") == normalize_answer(1234) == "1234"
    assert normalize_answer("$5.0") == "5" and normalize_answer(" yes ") == "yes"


def test_evaluators_run_in_the_loop_and_are_plotted(work, tmp_path, capsys):
    from llm_trainer.metrics import read_metrics
    from llm_trainer.plots import plan_panels
    evs = [MultipleChoiceTask("mc", work / "mc.jsonl"), PerplexityTask("ppl", work / "texts.jsonl", every=4),
           GenerationTask("gen", work / "gen.jsonl", generate_config=GenerateConfig(max_new_tokens=3,
                                                                                   do_sample=False))]
    tr = trainer(work, tmp_path, evs, max_steps=4, eval_interval=2)
    last = tr.train()
    records = read_metrics(tmp_path / "run")
    evals = {r["step"]: r for r in records if "eval/mc/acc" in r}
    assert sorted(evals) == [2, 4]
    assert "eval/ppl/ppl" not in evals[2] and "eval/ppl/ppl" in evals[4]          # every=4
    assert {"eval/gen/exact_match", "eval/mc/acc_norm"} <= set(evals[4]) and "eval/ppl/nll" in last
    printed = capsys.readouterr().err
    assert "step 2: eval/mc/acc" in printed and "eval/ppl/ppl" in printed
    panels, omitted = plan_panels([("run", records)])
    drawn = {k for p in panels for k in p.keys}
    for key in ("eval/mc/acc", "eval/mc/acc_norm", "eval/ppl/ppl", "eval/gen/exact_match"):
        assert key in drawn or key in omitted          # a value that never changed is written under the panels
    # the panels evaluation metrics go to, when they vary
    varying = [{"step": s, "eval/mc/acc": 0.1 * s, "eval/gen/exact_match": 0.2 * s, "eval_accuracy": 0.3 * s,
                "eval/gen/reward": s, "eval/ppl/ppl": 10.0 / s, "eval/ppl/nll": 1.0 / s, "loss": 1.0 / s}
               for s in (1, 2, 3)]
    panels, _ = plan_panels([("run", varying)])
    by_title = {p.title: p.keys for p in panels}
    assert by_title["accuracy"] == ["eval/mc/acc", "eval/gen/exact_match", "eval_accuracy"]
    assert by_title["eval/gen/reward"] == ["eval/gen/reward"] and by_title["eval/ppl/ppl"] == ["eval/ppl/ppl"]
    assert [p.options.get("log") for p in panels if p.keys == ["eval/ppl/ppl"]] == [True]


def test_task_data_errors_name_file_line_field(tmp_path):
    bad = tmp_path / "mc.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "choices": ["a", "b"], "answer": 0}) + "\n"
                   + json.dumps({"prompt": "q", "choices": ["a"], "answer": 0}) + "\n")
    with pytest.raises(DataError) as e:
        MultipleChoiceTask("mc", bad)
    assert (e.value.file, e.value.line, e.value.field) == (str(bad), 2, "choices")
    bad.write_text(json.dumps({"prompt": "q", "choices": ["a", "b"], "answer": 2}) + "\n")
    with pytest.raises(DataError, match="answer 2 is not the index"):
        MultipleChoiceTask("mc", bad)
    with pytest.raises(DataError) as e:
        GenerationTask("g", [{"prompt": "q"}])
    assert e.value.record == 0 and e.value.field == "answer"
    (tmp_path / "t.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match="malformed JSON") as e:
        PerplexityTask("p", tmp_path / "t.jsonl")
    assert e.value.line == 2
    with pytest.raises(ValueError, match="extract"):
        GenerationTask("g", [{"prompt": "q", "answer": 1}], extract="nope")


def test_tasks_are_evaluators_of_the_cli_run_table(work):
    from llm_trainer.cli.train_cmd import build_evaluators
    from llm_trainer.evaluation import Evaluator
    evs = build_evaluators([{"type": "llm_trainer.evaluation:MultipleChoiceTask", "name": "arc",
                             "data": str(work / "mc.jsonl"), "chat": True}])
    assert isinstance(evs[0], MultipleChoiceTask) and isinstance(evs[0], Evaluator) and evs[0].chat
