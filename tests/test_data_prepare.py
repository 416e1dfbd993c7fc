"""prepare_data: jsonl → token files → datasets round trip for every stage, parallel = serial, bad input reported."""
from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest

from llm_trainer.cli.prepare_data import main as prepare_main
from llm_trainer.data import DataError, DPODataset, PretrainDataset, RLDataset, SFTDataset
from llm_trainer.data.prepare import prepare
from llm_trainer.tokenizer import Tokenizer, train_tokenizer

WORDS = ("the quick brown fox jumps over a lazy dog hello world what is two plus four think answer "
         "step by step 1 2 3 4 5 6 7 8 9 0 + = ? ! , . café").split()

CHATS = [
    [{"role": "user", "content": "what is 2 + 2 ?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "be brief ."}, {"role": "user", "content": "hello"},
     {"role": "assistant", "content": "hello world"}, {"role": "user", "content": "and the fox ?"},
     {"role": "assistant", "content": "quick brown", "think": "the fox is quick"}],
    [{"role": "user", "content": [{"type": "text", "text": "café ?"}]}, {"role": "assistant", "content": "oui"}],
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    with open(d / "corpus.txt", "w", encoding="utf-8") as f:
        for _ in range(300):
            f.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "\n")
    train_tokenizer([d / "corpus.txt"], 400, d / "tok", template="chatml", show_progress=False)
    return Tokenizer(d / "tok")


def _jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def _prep(*args, **kw):
    kw.setdefault("progress", False)
    return prepare(*args, **kw)


# --------------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("template", [None, "plain"])
def test_sft_round_trip(tok, tmp_path, template):
    recs = [{"messages": m} for m in CHATS] + [{"prompt": "two plus two ?", "response": "four", "system": "math"}]
    stats = _prep("sft", tok, _jsonl(tmp_path / "sft.jsonl", recs), tmp_path / "out", template=template)
    assert (stats.documents, stats.skipped, stats.truncated) == (4, 0, 0)
    ds = SFTDataset(tmp_path / "out", vocab_size=tok.vocab_size)
    assert len(ds) == 4
    expected = CHATS + [[{"role": "system", "content": "math"}, {"role": "user", "content": "two plus two ?"},
                         {"role": "assistant", "content": "four"}]]
    for i, msgs in enumerate(expected):
        enc = tok.apply_chat_template(msgs, template=template)
        assert ds[i]["input_ids"].tolist() == enc.input_ids
        assert ds[i]["labels"].tolist() == enc.labels()
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["token_dtype"] == "uint16" and meta["template"] == (template or "chatml")
    assert np.load(tmp_path / "out" / "tokens.npy", mmap_mode="r").dtype == np.uint16


def test_dpo_and_reward_round_trip(tok, tmp_path):
    recs = [{"prompt": "what is 2 + 2 ?", "chosen": "4", "rejected": "5"},
            {"prompt": [{"role": "system", "content": "be brief ."}, {"role": "user", "content": "hello"}],
             "chosen": [{"role": "assistant", "content": "hello world"}],
             "rejected": [{"role": "assistant", "content": "the lazy dog", "think": "hmm"}]}]
    for stage in ("dpo", "reward"):
        _prep(stage, tok, _jsonl(tmp_path / "p.jsonl", recs), tmp_path / stage)
        ds = DPODataset(tmp_path / stage)
        for i, r in enumerate(recs):
            p = [{"role": "user", "content": r["prompt"]}] if isinstance(r["prompt"], str) else r["prompt"]
            gen = tok.apply_chat_template(p, add_generation_prompt=True).input_ids
            for side in ("chosen", "rejected"):
                c = [{"role": "assistant", "content": r[side]}] if isinstance(r[side], str) else r[side]
                enc = tok.apply_chat_template(p + c)
                assert ds[i][f"{side}_input_ids"].tolist() == enc.input_ids
                assert ds[i][f"{side}_labels"].tolist() == enc.labels()
            assert ds.prompt_length(i) == len(gen)
        assert json.loads((tmp_path / stage / "meta.json").read_text())["stage"] == stage


def test_rl_round_trip(tok, tmp_path):
    recs = [{"prompt": "what is 2 + 2 ?", "answer": "4"}, {"prompt": CHATS[1][:2], "answer": 42},
            {"prompt": "hello"}]
    _prep("rl", tok, _jsonl(tmp_path / "rl.jsonl", recs), tmp_path / "rl")
    ds = RLDataset(tmp_path / "rl")
    for i, r in enumerate(recs):
        p = [{"role": "user", "content": r["prompt"]}] if isinstance(r["prompt"], str) else r["prompt"]
        assert ds[i]["prompt_ids"].tolist() == tok.apply_chat_template(p, add_generation_prompt=True).input_ids
        text = str(r.get("answer", ""))
        assert ds[i]["answer_text"] == text
        assert ds[i]["answer_ids"].tolist() == (tok.encode(text) if text else [])


def test_pretrain_round_trip(tok, tmp_path):
    texts = ["the quick brown fox", "hello world !", "café 1 + 2 = 3"]
    stats = _prep("pretrain", tok, _jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts]), tmp_path / "pre")
    assert stats.output.endswith("pre.npy")
    arr = np.load(tmp_path / "pre.npy", mmap_mode="r")
    expected = sum((tok.encode(t) + [tok.eos_token_id] for t in texts), [])
    assert arr.dtype == np.uint16 and arr.tolist() == expected and stats.tokens == len(expected)
    assert PretrainDataset(tmp_path / "pre.npy", 4)[1]["input_ids"].tolist() == expected[4:8]


def test_images_column(tok, tmp_path):
    img = tok.image_token
    recs = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what ?"}]},
                          {"role": "assistant", "content": "a fox"}], "images": "fox.png"},
            {"messages": CHATS[0]},
            {"prompt": f"{img} and {img} ?", "response": "two dogs", "images": ["a.png", "b.png"]}]
    _prep("sft", tok, _jsonl(tmp_path / "v.jsonl", recs), tmp_path / "v", image_field="images")
    ds = SFTDataset(tmp_path / "v")
    assert [ds[i]["images"] for i in range(3)] == [["fox.png"], [], ["a.png", "b.png"]]
    assert (ds[0]["input_ids"] == tok.image_token_id).sum() == 1
    bad = [{"prompt": "no placeholder here", "response": "x", "images": ["a.png"]}]
    with pytest.raises(DataError, match=r"b\.jsonl, line 1, field 'images': 1 image path\(s\) but 0 image "
                                        r"placeholder\(s\) '<image>' in the text"):
        _prep("sft", tok, _jsonl(tmp_path / "b.jsonl", bad), tmp_path / "vb", image_field="images")


def test_max_length_truncates_and_counts(tok, tmp_path):
    long_text = " ".join(["fox"] * 50)
    recs = [{"prompt": "hi", "response": long_text}, {"prompt": "hi", "response": "ok"},
            {"prompt": long_text, "response": "ok"}]
    stats = _prep("sft", tok, _jsonl(tmp_path / "s.jsonl", recs), tmp_path / "s", max_length=30)
    assert (stats.documents, stats.truncated, stats.dropped) == (2, 1, 1)  # a prompt filling 30 tokens is dropped
    ds = SFTDataset(tmp_path / "s")
    assert len(ds[0]["input_ids"]) == 30 and len(ds[1]["input_ids"]) == 22
    rl = _prep("rl", tok, _jsonl(tmp_path / "r.jsonl", [{"prompt": long_text}, {"prompt": "hi"}]), tmp_path / "r",
               max_length=30)
    assert (rl.documents, rl.dropped) == (1, 1)


def test_cli_parallel_equals_serial(tok, tmp_path, capsys):
    rng = random.Random(3)
    recs = []
    for i in range(120):
        m = list(CHATS[i % 3])
        m = m[:-1] + [{"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9)))}]
        recs.append({"messages": m})
    inp = _jsonl(tmp_path / "a.jsonl", recs[:70]), _jsonl(tmp_path / "b.jsonl", recs[70:])
    base = ["--stage", "sft", "--tokenizer", str(tok.path), "--input", *map(str, inp), "--chunk-lines", "16"]
    assert prepare_main(base + ["--output", str(tmp_path / "w1"), "--workers", "1"]) == 0
    assert prepare_main(base + ["--output", str(tmp_path / "w2"), "--workers", "2"]) == 0
    captured = capsys.readouterr()
    assert "prepare_data: wrote" in captured.out and "120 documents" in captured.out
    assert "0 truncated, 0 skipped" in captured.out
    assert "docs/s" in captured.err and "tokens/s" in captured.err and "100.0%" in captured.err
    for name in ("tokens.npy", "offsets.npy", "loss_mask.npy"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()
    assert len(SFTDataset(tmp_path / "w2")) == 120


# ------------------------------------------------------------------------------------------------------ bad input
GOOD = {"prompt": "hi", "response": "hello"}


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "hi", "response": ', r"line 2: malformed JSON \(Expecting value at column 30\)"),
    ('["prompt", "hi"]', r"line 2: expected a JSON object, got list"),
    ('{"prompt": "hi"}', r"line 2, field 'response': missing field"),
    ('{"prompt": "hi", "response": 3}', r"line 2, field 'response': expected a string, got int"),
    ('{"prompt": "hi", "response": "   "}', r"line 2, field 'response': empty string"),
    ('{"messages": "hello"}', r"line 2, field 'messages': expected a list of messages, got str"),
    ('{"messages": [{"content": "x"}]}', r"line 2, field 'messages': message 0 has no string 'role'"),
    ('{"messages": [{"role": "user", "content": "x"}]}',
     r"line 2, field 'messages': no assistant message: nothing to train on"),
    ('{"text": "x"}', r"line 2, field 'messages': missing field \(an SFT record needs 'messages', or 'prompt' and "
                      r"'response'\)"),
])
def test_bad_sft_records_are_reported(tok, tmp_path, line, message):
    f = _jsonl(tmp_path / "bad.jsonl", [GOOD, line, GOOD])
    with pytest.raises(DataError, match=r"bad\.jsonl, " + message):
        _prep("sft", tok, f, tmp_path / "out")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["bad.jsonl"]


@pytest.mark.parametrize("stage, record, message", [
    ("pretrain", {"text": 5}, r"line 1, field 'text': expected a string, got int"),
    ("pretrain", {"txt": "a"}, r"line 1, field 'text': missing field"),
    ("dpo", {"prompt": "hi", "chosen": "a", "rejected": "a"}, r"line 1, field 'rejected': identical to 'chosen'"),
    ("dpo", {"prompt": "hi", "chosen": "", "rejected": "a"}, r"line 1, field 'chosen': empty string"),
    ("reward", {"prompt": "hi", "chosen": "a"}, r"line 1, field 'rejected': missing field"),
    ("rl", {"prompt": "hi", "answer": [1]}, r"line 1, field 'answer': expected a string or a number, got list"),
    ("rl", {"prompt": 7}, r"line 1, field 'prompt': expected a list of messages, got int"),
])
def test_bad_records_other_stages(tok, tmp_path, stage, record, message):
    with pytest.raises(DataError, match=r"x\.jsonl, " + message):
        _prep(stage, tok, _jsonl(tmp_path / "x.jsonl", [record]), tmp_path / "out")


def test_empty_and_invalid_files(tok, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl: file is empty \(0 bytes\)"):
        _prep("sft", tok, tmp_path / "empty.jsonl", tmp_path / "out")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match=r"blank\.jsonl: file is empty \(no records\)"):
        _prep("sft", tok, tmp_path / "blank.jsonl", tmp_path / "out")
    (tmp_path / "latin.jsonl").write_bytes(b'{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl, line 1: not valid UTF-8"):
        _prep("sft", tok, tmp_path / "latin.jsonl", tmp_path / "out")
    with pytest.raises(DataError, match=r"nope\.jsonl: input file not found"):
        _prep("sft", tok, tmp_path / "nope.jsonl", tmp_path / "out")


def test_skip_bad_counts_and_continues(tok, tmp_path, capsys):
    f = _jsonl(tmp_path / "mixed.jsonl", [GOOD, "{oops", GOOD, {"prompt": 1, "response": "x"}, GOOD])
    (tmp_path / "empty.jsonl").write_text("")
    rc = prepare_main(["--stage", "sft", "--tokenizer", str(tok.path), "--input", str(f),
                       str(tmp_path / "empty.jsonl"), "--output", str(tmp_path / "out"), "--skip-bad", "--quiet",
                       "--workers", "2", "--chunk-lines", "2"])
    assert rc == 0
    cap = capsys.readouterr()
    assert "3 documents" in cap.out and "3 skipped" in cap.out
    assert "mixed.jsonl, line 2: malformed JSON" in cap.err
    assert "mixed.jsonl, line 4, field 'prompt': expected a string, got int" in cap.err
    assert "empty.jsonl: file is empty" in cap.err
    assert len(SFTDataset(tmp_path / "out")) == 3
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["stats"]["skipped"] == 3


def test_failure_leaves_existing_output_intact(tok, tmp_path, capsys):
    _prep("sft", tok, _jsonl(tmp_path / "good.jsonl", [GOOD]), tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    bad = _jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, "{broken"])
    rc = prepare_main(["--stage", "sft", "--tokenizer", str(tok.path), "--input", str(bad), "--output",
                       str(tmp_path / "out"), "--quiet", "--workers", "1"])
    assert rc == 2
    assert "prepare_data: error: " in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl", "out"]
    np.save(tmp_path / "pre.npy", np.arange(5, dtype=np.uint16))
    with pytest.raises(DataError):
        _prep("pretrain", tok, _jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": None}]), tmp_path / "pre.npy")
    assert np.load(tmp_path / "pre.npy").tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("stage, line, message", [
    ("sft", r'{"prompt": "hi \ud800 there", "response": "x"}',
     r"line 2, field 'prompt': prompt has a lone surrogate \\ud800 at character 3 \(an unpaired \\u escape"),
    ("sft", '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a\\udc00"}]}',
     r"line 2, field 'messages': messages\[1\]\.content has a lone surrogate \\udc00 at character 1"),
    ("sft", '{"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "x"}]}',
     r"line 2, field 'messages': message 0 \(role 'user'\): 'content' is null"),
    ("sft", '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}',
     r"line 2, field 'messages': message 1 \(role 'assistant'\): 'content' is missing"),
    ("rl", '{"prompt": "hi", "answer": NaN}', r"line 2, field 'answer': answer is nan, not a finite number"),
    ("rl", '{"prompt": "hi", "answer": -Infinity}', r"line 2, field 'answer': answer is -inf, not a finite number"),
    ("dpo", '{"prompt": "hi", "chosen": "a", "rejected": "b", "extra": {"w": [1, NaN]}}',
     r"line 2, field 'extra': extra\.w\[1\] is nan"),
])
def test_invalid_values_are_named(tok, tmp_path, stage, line, message):
    good = {"sft": GOOD, "rl": {"prompt": "hi"}, "dpo": {"prompt": "hi", "chosen": "a", "rejected": "b"}}[stage]
    with pytest.raises(DataError, match=r"v\.jsonl, " + message):
        _prep(stage, tok, _jsonl(tmp_path / "v.jsonl", [good, line]), tmp_path / "out")


def test_tool_call_messages_may_have_null_content(tok, tmp_path):
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
    rec = {"messages": [{"role": "user", "content": "2 + 2 ?"},
                        {"role": "assistant", "content": None, "tool_calls": [call]},
                        {"role": "tool", "content": "4"}, {"role": "assistant", "content": "4"}],
           "tools": [{"type": "function", "function": {"name": "add", "parameters": {}}}]}
    assert _prep("sft", tok, _jsonl(tmp_path / "t.jsonl", [rec]), tmp_path / "out").documents == 1
    with pytest.raises(DataError, match=r"line 1, field 'tools': expected a list of tool schemas"):
        _prep("sft", tok, _jsonl(tmp_path / "b.jsonl", [{**rec, "tools": "add"}]), tmp_path / "out2")


def test_progress_prints_the_final_line_once(tok, tmp_path):
    stream = io.StringIO()  # not a terminal
    prepare("sft", tok, _jsonl(tmp_path / "p.jsonl", [GOOD] * 5), tmp_path / "out", progress_stream=stream)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "100.0%" in lines[0] and "5 docs" in lines[0]


def test_model_template_kwargs_and_reasoning_history(tok, tmp_path):
    """A tokenizer with a model's own template (Qwen3): template kwargs reach RL generation prompts and are recorded;
    SFT records render exactly as apply_chat_template renders them, reasoning history included."""
    trl = pytest.importorskip("trl")
    from pathlib import Path
    source = (Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja").read_text()
    d = tmp_path / "qwen3_tok"
    tok.save(d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": source}))
    qwen = Tokenizer(d)
    assert qwen.chat_template == "default"
    _prep("rl", d, _jsonl(tmp_path / "rl.jsonl", [{"prompt": "what is 2 + 2 ?", "answer": "4"}]), tmp_path / "rl",
          template_kwargs={"enable_thinking": False})
    prompt = RLDataset(tmp_path / "rl")[0]["prompt_ids"].tolist()
    assert qwen.decode(prompt, skip_special_tokens=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    meta = json.loads((tmp_path / "rl" / "meta.json").read_text())
    assert meta["template"] == "default" and meta["template_kwargs"] == {"enable_thinking": False}
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world", "think": "greet"},
            {"role": "user", "content": "and the fox ?"}, {"role": "assistant", "content": "quick", "think": "fox"}]
    for history in ("template", "keep"):
        out = tmp_path / f"sft_{history}"
        rc = prepare_main(["--stage", "sft", "--tokenizer", str(d), "--input", str(_jsonl(tmp_path / "s.jsonl", [
            {"messages": chat}])), "--output", str(out), "--reasoning-history", history, "--quiet", "--workers", "1"])
        assert rc == 0
        enc = qwen.apply_chat_template(chat, reasoning_history=history)
        item = SFTDataset(out)[0]
        assert item["input_ids"].tolist() == enc.input_ids and item["labels"].tolist() == enc.labels()
        trained = qwen.decode([t for t in enc.labels() if t != -100], skip_special_tokens=False)
        assert ("<think>\ngreet\n</think>" in trained) == (history == "keep")
    # the CLI reads a template from a .jinja file and kwargs as JSON
    (tmp_path / "t.jinja").write_text(source)
    rc = prepare_main(["--stage", "rl", "--tokenizer", str(tok.path), "--input", str(tmp_path / "rl.jsonl"),
                       "--output", str(tmp_path / "rl2"), "--template", str(tmp_path / "t.jinja"),
                       "--template-kwargs", '{"enable_thinking": false}', "--quiet", "--workers", "1"])
    assert rc == 0 and RLDataset(tmp_path / "rl2")[0]["prompt_ids"].tolist() == prompt
    with pytest.raises(SystemExit):
        prepare_main(["--stage", "rl", "--tokenizer", str(d), "--input", "x", "--output", "y",
                      "--template-kwargs", "enable_thinking=false"])


def test_template_errors_name_template_and_message(tok, tmp_path):
    bad = "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system messages') }}" \
          "{% endif %}{{ m.content }}{% endfor %}"
    recs = [GOOD, {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                {"role": "assistant", "content": "a"}]}]
    with pytest.raises(DataError, match=r"line 2, field 'messages': chat template 'custom' from the template argument "
                                        r"failed at message 0 \(role 'system'\): no system messages"):
        _prep("sft", tok, _jsonl(tmp_path / "e.jsonl", recs), tmp_path / "out", template=bad)
    with pytest.raises(ValueError, match="unknown chat template 'nope'"):
        _prep("sft", tok, _jsonl(tmp_path / "e.jsonl", recs), tmp_path / "out", template="nope")
