"""lm-evaluation-harness on an LlmModel folder through llm_trainer.evaluation.lm_eval_adapter, with local task files
(skipped unless the ``lm-eval`` extra is installed): the harness's multiple-choice accuracy equals our
MultipleChoiceTask's, its generate_until equals our greedy generation cut at the stop string, and its rolling
log-likelihood equals the sum over its windows computed from full logits."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow            # importing the harness and its datasets takes ~30 s here

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "dist_scripts"))
from eval_parity import GEN_ITEMS, MC_ITEMS, TEXTS, make_workdir  # noqa: E402

TASKS = """
task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
GEN_TASK = """
task: toy_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "="]
  max_gen_toks: 5
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = make_workdir(tmp_path_factory.mktemp("lmeval"))
    tasks = work / "tasks"
    tasks.mkdir()
    (tasks / "toy_mc.yaml").write_text(TASKS.format(mc=work / "mc.jsonl"))
    (tasks / "toy_gen.yaml").write_text(GEN_TASK.format(gen=work / "gen.jsonl"))
    # the model folder lm-eval reads: weights + tokenizer together
    from llm_trainer.tokenizer import Tokenizer
    Tokenizer(work / "tok").save(work / "init")
    return work, tasks


def test_harness_multiple_choice_equals_ours(setup, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager
    from llm_trainer.evaluation import MultipleChoiceTask
    from llm_trainer.evaluation.lm_eval_adapter import LlmTrainerLM
    from test_evaluation import trainer
    work, tasks = setup
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    lm = LlmTrainerLM(pretrained=str(work / "init"), batch_size=2)
    res = lm_eval.simple_evaluate(model=lm, tasks=["toy_mc", "toy_gen"], task_manager=TaskManager(
        include_path=str(tasks)), log_samples=True)
    mc = res["results"]["toy_mc"]
    ours = MultipleChoiceTask("mc", work / "mc.jsonl")(trainer(work, tmp_path))
    print(f"\nlm-eval toy_mc acc {mc['acc,none']:.3f} acc_norm {mc['acc_norm,none']:.3f}; ours {ours}")
    assert mc["acc,none"] == pytest.approx(ours["eval/mc/acc"])
    assert mc["acc_norm,none"] == pytest.approx(ours["eval/mc/acc_norm"])
    # generate_until: our greedy generation of the plain prompt, cut at the first stop string
    from llm_trainer.generation import GenerateConfig, generate
    from llm_trainer.model import LlmModel
    model = LlmModel.from_pretrained(work / "init")
    got = [s["resps"][0][0] for s in sorted(res["samples"]["toy_gen"], key=lambda s: s["doc_id"])]
    for item, text in zip(GEN_ITEMS, got):
        out = generate(model, [lm.tok.encode(item["prompt"])], GenerateConfig(max_new_tokens=5, do_sample=False),
                       eos_token_ids=[lm.tok.eos_token_id], pad_token_id=lm.tok.pad_token_id)
        full = lm.tok.decode(out.completions[0])
        cut = min([full.find(u) for u in ("\n", "=") if u in full], default=len(full))
        assert text == full[:cut]
    assert len(got) == len(GEN_ITEMS) and json.dumps(res["results"]["toy_gen"])


def test_rolling_loglikelihood_sums_the_harness_windows(setup):
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    from llm_trainer.evaluation.lm_eval_adapter import LlmTrainerLM
    from llm_trainer.model import LlmModel
    work, _ = setup
    lm = LlmTrainerLM(pretrained=str(work / "init"), batch_size=3, max_length=8)
    reqs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=0) for t in TEXTS]
    got = lm.loglikelihood_rolling(reqs)
    model = LlmModel.from_pretrained(work / "init")
    for text, value in zip(TEXTS, got):
        want = 0.0
        windows = get_rolling_token_windows(token_list=lm.tok.encode(text), prefix_token=lm.prefix_token_id,
                                            max_seq_len=8, context_len=1)
        for ctx, pred in map(make_disjoint_window, windows):
            ids = list(ctx) + list(pred)
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            want += sum(float(lp[t - 1, ids[t]]) for t in range(len(ctx), len(ids)))
        assert value == pytest.approx(want, rel=1e-6)
    ll = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=(MC_ITEMS[0]["prompt"], " 7"),
                                    idx=0)])
    assert isinstance(ll[0][0], float) and isinstance(ll[0][1], bool)
