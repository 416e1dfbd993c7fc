"""Tokenizer: chat templates (literal strings, assistant masks), encode/decode, save/load, train_tokenizer CLI."""
from __future__ import annotations

import json
import random
import warnings

import pytest

from llm_trainer.chat import TEMPLATES
from llm_trainer.cli.train_tokenizer import main as train_tokenizer_main
from llm_trainer.tokenizer import ChatEncoding, Tokenizer, train_tokenizer

WORDS = ("the quick brown fox jumps over a lazy dog hello world how are you fine thanks what is two plus "
         "four answer think step by step weather today sunny rain 1 2 3 4 42 ! ? , . : ; ( ) café 你好").split()

CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello, how can I help?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4.", "think": "2 plus 2 is 4."},
]


def _corpus(path, n=400, seed=0):
    rng = random.Random(seed)
    extra = ["".join(rng.choice("abcdefghijklmnoprstuvwy") for _ in range(rng.randint(2, 7))) for _ in range(300)]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(" ".join(rng.choice(WORDS if rng.random() < 0.5 else extra) for _ in range(rng.randint(3, 15)))
                    + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    _corpus(d / "a.txt")
    with open(d / "b.jsonl", "w", encoding="utf-8") as f:
        for i in range(50):
            f.write(json.dumps({"text": f"document {i}: the weather today is sunny"}) + "\n")
            f.write(json.dumps({"messages": [{"role": "user", "content": "what is two plus two?"},
                                             {"role": "assistant", "content": "four", "think": "add them"}]}) + "\n")
    return d


@pytest.fixture(scope="module")
def tokenizers(corpus, tmp_path_factory):
    out = {}
    for name in ("chatml", "llama3", "plain"):
        d = tmp_path_factory.mktemp(f"tok_{name}")
        train_tokenizer([corpus / "a.txt", corpus / "b.jsonl"], 600, d, template=name, show_progress=False)
        out[name] = Tokenizer(d)
    return out


# ------------------------------------------------------------------------------------------------ literal strings
def test_chatml_string(tokenizers):
    tok = tokenizers["chatml"]
    assert tok.chat_template == "chatml"
    expected = (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello, how can I help?<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n2 plus 2 is 4.\n</think>\n\n4.<|im_end|>\n"
    )
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == expected
    assert tok.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello, how can I help?<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_llama3_string(tokenizers):
    tok = tokenizers["llama3"]
    assert tok.chat_template == "llama3"
    expected = (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello, how can I help?<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<think>\n2 plus 2 is 4.\n</think>\n\n4.<|eot_id|>"
    )
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == expected
    gen = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert gen == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_plain_string(tokenizers):
    tok = tokenizers["plain"]
    assert tok.chat_template == "plain" and tok.eos_token == "<|endoftext|>"
    assert tok.apply_chat_template(CONVERSATION[:3], tokenize=False, add_generation_prompt=False) == (
        "System: You are helpful.\n\nUser: Hi!\nAssistant: Hello, how can I help?<|endoftext|>\n")
    assert tok.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True) == \
        "User: Hi!\nAssistant:"


# ------------------------------------------------------------------------------------------------ assistant masks
EXPECTED_TRAINED = {
    "chatml": ["Hello, how can I help?<|im_end|>", "<think>\n2 plus 2 is 4.\n</think>\n\n4.<|im_end|>"],
    "llama3": ["Hello, how can I help?<|eot_id|>", "<think>\n2 plus 2 is 4.\n</think>\n\n4.<|eot_id|>"],
    "plain": [" Hello, how can I help?<|endoftext|>", " <think>\n2 plus 2 is 4.\n</think>\n\n4.<|endoftext|>"],
}


@pytest.mark.parametrize("name", ["chatml", "llama3", "plain"])
def test_assistant_mask_exact(tokenizers, name):
    tok = tokenizers[name]
    enc = tok.apply_chat_template(CONVERSATION)
    assert isinstance(enc, ChatEncoding) and len(enc.input_ids) == len(enc.assistant_mask)
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    # segment-by-segment encoding equals encoding the whole string
    assert enc.input_ids == tok.encode(text)
    assert tok.decode(enc.input_ids, skip_special_tokens=False) == text
    # the masked tokens form exactly the assistant bodies + end-of-turn tokens, in two contiguous runs
    runs, cur = [], []
    for t, m in zip(enc.input_ids, enc.assistant_mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    assert [tok.decode(r, skip_special_tokens=False) for r in runs] == EXPECTED_TRAINED[name]
    # each run ends with the end-of-turn token, which is one token
    eot = tok.chat_stop_token_ids()[0]
    assert all(r[-1] == eot for r in runs)
    # everything else is exactly the prompt text
    untrained = "".join(tok.decode([t], skip_special_tokens=False)
                        for t, m in zip(enc.input_ids, enc.assistant_mask) if not m)
    assert untrained == text.replace(EXPECTED_TRAINED[name][0], "").replace(EXPECTED_TRAINED[name][1], "")
    labels = enc.labels()
    assert [x for x in labels if x != -100] == [t for t, m in zip(enc.input_ids, enc.assistant_mask) if m]


@pytest.mark.parametrize("name", ["chatml", "llama3", "plain"])
def test_generation_prompt_is_prefix_of_full_conversation(tokenizers, name):
    tok = tokenizers[name]
    prompt = tok.apply_chat_template(CONVERSATION[:4], add_generation_prompt=True)
    full = tok.apply_chat_template(CONVERSATION)
    assert full.input_ids[:len(prompt)] == prompt.input_ids
    assert sum(prompt.assistant_mask) == sum(full.assistant_mask[:len(prompt)])  # only the first answer
    # the answer that follows the prompt is trained entirely, up to the separator after its end-of-turn token
    tail = full.assistant_mask[len(prompt):]
    assert all(tail) if name == "llama3" else (all(tail[:-1]) and tail[-1] == 0)


def test_hf_jinja_matches(tokenizers, tmp_path):
    """The built-ins are saved as Jinja with {% generation %} blocks: transformers renders the same strings, ids and
    assistant masks from the saved folder."""
    transformers = pytest.importorskip("transformers")
    msgs = [{**m, "reasoning_content": m["think"]} if "think" in m else m for m in CONVERSATION]
    for name, tok in tokenizers.items():
        d = tok.save(tmp_path / name)
        assert Tokenizer(d).chat_template == name  # the saved Jinja is recognised as the built-in
        hf = transformers.AutoTokenizer.from_pretrained(d)
        for gen in (False, True):
            conv = msgs[:4] if gen else msgs
            ours = tok.apply_chat_template(conv, add_generation_prompt=gen)
            theirs = hf.apply_chat_template(conv, add_generation_prompt=gen, return_dict=True,
                                            return_assistant_tokens_mask=True)
            assert tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen) == \
                hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen), name
            assert ours.input_ids == list(theirs["input_ids"]), name
            assert ours.assistant_mask == list(theirs["assistant_masks"]), name
        assert hf.encode("hello world café", add_special_tokens=False) == tok.encode("hello world café")


def test_template_override_and_missing_tokens(tokenizers):
    tok = tokenizers["plain"]
    with pytest.raises(ValueError, match="needs the special tokens"):
        tok.apply_chat_template(CONVERSATION, template="chatml")
    assert "<|im_start|>" in tok.apply_chat_template(CONVERSATION, template="chatml", tokenize=False)
    with pytest.raises(ValueError, match="unknown chat template"):
        tok.apply_chat_template(CONVERSATION, template="vicuna")


def test_message_validation(tokenizers):
    tok = tokenizers["chatml"]
    with pytest.raises(ValueError, match="empty"):
        tok.apply_chat_template([])
    with pytest.raises(ValueError, match="message 1 has no 'role'"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"content": "b"}])
    with pytest.raises(ValueError, match="only assistant"):
        tok.apply_chat_template([{"role": "user", "content": "a", "think": "x"}])
    with pytest.raises(TypeError):
        tok.apply_chat_template({"role": "user", "content": "a"})
    # list-of-parts content with an image placeholder
    s = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}],
                                tokenize=False)
    assert s == "<|im_start|>user\n<image>what?<|im_end|>\n"
    assert tok.image_token_id is not None and tok.image_token_id in tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}]}]).input_ids


# ---------------------------------------------------------------------------------------------- encode / decode
def test_round_trip_and_specials(tokenizers):
    tok = tokenizers["chatml"]
    for text in ["hello world", "  leading and trailing  \n\n", "emoji 🤖 and 你好, café\ttab", "", "x" * 500,
                 "unseen: zqxjv ÆØÅ ∑∫"]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("hi<|im_end|>there")
    assert tok.token_to_id("<|im_end|>") in ids
    assert tok.decode(ids) == "hithere"
    assert tok.decode(ids, skip_special_tokens=False) == "hi<|im_end|>there"
    # think tags are single, non-special tokens: they survive skip_special_tokens
    t = tok.encode("<think>a</think>")
    assert t[0] == tok.token_to_id("<think>") and t[-1] == tok.token_to_id("</think>")
    assert tok.decode(t) == "<think>a</think>"
    texts = ["a b c", "the quick brown fox", "你好"]
    assert tok.batch_encode(texts) == [tok.encode(x) for x in texts]
    assert tok.batch_decode(tok.batch_encode(texts)) == texts
    assert tok.vocab_size == 600 == len(tok.get_vocab())
    assert tok.eos_token_id == tok.token_to_id("<|endoftext|>")
    assert tok.pad_token_id == tok.token_to_id("<pad>")
    assert tok.stop_token_ids == [tok.token_to_id("<|im_end|>"), tok.eos_token_id]
    assert set(tok.special_tokens) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<pad>"}
    torch = pytest.importorskip("torch")
    assert tok.decode(torch.tensor(tok.encode("hello"))) == "hello"


def test_save_load_round_trip(tokenizers, tmp_path):
    tok = tokenizers["llama3"]
    tok.add_special_tokens(["<|tool|>"])
    tok.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["llm_trainer_chat_template"] == "llama3" and cfg["eos_token"] == "<|end_of_text|>"
    again = Tokenizer(tmp_path)
    assert again.vocab_size == tok.vocab_size == 601
    assert again.token_to_id("<|tool|>") == 600
    assert (again.eos_token_id, again.pad_token_id, again.bos_token_id) == \
        (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id)
    assert again.apply_chat_template(CONVERSATION) == tok.apply_chat_template(CONVERSATION)
    # a bare tokenizer.json file also loads: eos from fallbacks, template guessed from the vocabulary (said once)
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "tokenizer.json").write_bytes((tmp_path / "tokenizer.json").read_bytes())
    bare = Tokenizer(tmp_path / "bare" / "tokenizer.json")
    assert bare.chat_template == "llama3" and bare.eos_token == "<|end_of_text|>"
    with pytest.warns(UserWarning, match="has no chat template; using the built-in 'llama3' template, guessed"):
        bare.apply_chat_template(CONVERSATION)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bare.apply_chat_template(CONVERSATION)


def test_config_special_tokens_and_jinja_detection(tokenizers, tmp_path):
    tok = tokenizers["chatml"]
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": {"content": "<|im_end|>", "special": True}, "pad_token": "<|endoftext|>",
        "added_tokens_decoder": {"9999": {"content": "<|extra|>", "special": True}},
        "chat_template": "{% for m in messages %}{{'<|im_start|>' + m['role']}}...<|im_end|>{% endfor %}",
    }))
    t = Tokenizer(tmp_path)
    assert t.eos_token_id == tok.token_to_id("<|im_end|>")
    assert t.pad_token_id == tok.token_to_id("<|endoftext|>")
    assert t.token_to_id("<|extra|>") == tok.vocab_size  # declared only in the config: added
    assert t.chat_template == "default"  # the model's own template, rendered as written
    assert t.apply_chat_template(CONVERSATION[:2], tokenize=False) == \
        "<|im_start|>system...<|im_end|><|im_start|>user...<|im_end|>"
    assert t.stop_token_ids == [t.token_to_id("<|im_end|>")]
    t.save(tmp_path / "again")  # the model's template is kept
    assert "..." in json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())["chat_template"]
    t.chat_template = "chatml"  # a built-in can still be chosen by name
    assert t.apply_chat_template(CONVERSATION[:2], tokenize=False).startswith("<|im_start|>system\nYou are")
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'"):
        t.chat_template = "vicuna"
    assert t.chat_template == "chatml"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError):
        Tokenizer(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------- train_tokenizer
def test_train_tokenizer_cli(corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    rc = train_tokenizer_main([str(corpus / "a.txt"), str(corpus / "b.jsonl"), "--vocab-size", "500",
                               "-o", str(out), "--min-frequency", "1"])
    assert rc == 0
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    captured = capsys.readouterr()
    assert "train_tokenizer" in captured.out and "500" in captured.out
    tok = Tokenizer(out)
    assert tok.vocab_size == 500 and tok.chat_template == "chatml"
    ids = tok.encode("the quick brown fox")
    assert len(ids) < len("the quick brown fox")  # merges were learned
    # a folder argument is searched for .txt/.jsonl
    assert train_tokenizer_main([str(corpus), "--vocab-size", "400", "-o", str(tmp_path / "t2"), "--quiet"]) == 0


def test_train_tokenizer_errors(corpus, tmp_path, capsys):
    assert train_tokenizer_main([str(tmp_path / "nope.txt"), "--vocab-size", "400", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "training file not found" in err and "nope.txt" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": broken}\n')
    assert train_tokenizer_main([str(bad), "--vocab-size", "400", "-o", str(tmp_path / "o"), "--quiet"]) == 2
    assert f"{bad}:3: invalid JSON" in capsys.readouterr().err
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"nofield.jsonl:1: expected a JSON object with a string 'text'"):
        train_tokenizer([nofield], 400, show_progress=False)
    with pytest.raises(ValueError, match="vocab_size must be"):
        train_tokenizer([corpus / "a.txt"], 100, show_progress=False)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="bin.txt: not UTF-8"):
        train_tokenizer([binary], 400, show_progress=False)


def test_templates_registry():
    assert set(TEMPLATES) == {"chatml", "llama3", "plain"}


def test_train_tokenizer_prints_no_blank_lines_without_a_terminal(corpus, tmp_path, capfd):
    # capfd captures the file descriptors, where the Rust progress bar would write
    assert train_tokenizer_main([str(corpus / "a.txt"), "--vocab-size", "400", "-o", str(tmp_path / "t")]) == 0
    out, err = capfd.readouterr()
    lines = (out + err).splitlines()
    assert lines and all(line.strip() for line in lines), lines
    assert all(line.startswith("train_tokenizer: ") for line in lines)
