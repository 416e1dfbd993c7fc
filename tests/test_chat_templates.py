"""Chat templates against ``transformers``: every template TRL ships (copies of real models' ``chat_template``),
rendered by ``Tokenizer.apply_chat_template`` and by ``transformers``' ``apply_chat_template`` from the SAME
``tokenizer.json`` + ``tokenizer_config.json``: strings, token ids and (``{% generation %}`` templates) assistant
masks must be equal. Templates without generation blocks get prefix-derived masks, checked against token prefixes
that ``transformers`` renders, and against TRL's ``*_training`` variants where those wrap exactly the generated text.
Also: named templates, ``chat_template.jinja`` files, the sandbox, errors naming template and message, reasoning
history, template kwargs, stop tokens, save/load.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers  # noqa: E402
from tokenizers import Tokenizer as RustTokenizer  # noqa: E402

from llm_trainer.chat import ChatTemplateError  # noqa: E402
from llm_trainer.chat.jinja import written_control_tokens  # noqa: E402
from llm_trainer.tokenizer import Tokenizer  # noqa: E402

transformers.logging.set_verbosity_error()
TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
TEMPLATE_NAMES = sorted(p.stem for p in TRL_TEMPLATES.glob("*.jinja"))

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}},
                   "required": ["city"]}}}]
SYS = {"role": "system", "content": "You are a concise assistant."}
U1 = {"role": "user", "content": "What is the capital of France?"}
A1 = {"role": "assistant", "content": "The capital of France is Paris."}
U2 = {"role": "user", "content": "And of Germany?"}
A2 = {"role": "assistant", "content": "Berlin."}
CONVERSATIONS = {
    "single": [U1, A1],
    "system": [SYS, U1, A1],
    "multi_turn": [SYS, U1, A1, U2, A2],
    "tools": [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": "", "tool_calls": [
                  {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
              {"role": "tool", "name": "get_weather", "content": "{\"temp\": 21}"},
              {"role": "assistant", "content": "It is 21 degrees in Paris."}],
    "reasoning": [U1, {**A1, "reasoning_content": "France's capital city is Paris."}, U2,
                  {**A2, "reasoning_content": "Germany's capital is Berlin."}],
    "image": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
              {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
}
# TRL training variants whose {% generation %} block is exactly what follows the generation prompt, up to the end of
# the turn — where prefix-derived masks of the original template must equal them. (The others also train the
# generation prompt's prefill such as "<think>\n", the role header, or a newline the generation prompt already wrote.)
SAME_SPAN_FAMILIES = ("cohere", "cohere2", "gemma", "gemma3", "idefics3", "lfm2", "lfm2_v2", "llama3", "phi3", "phi3_5",
                      "qwen2_5_vl", "qwen3_instruct_2507", "qwen3_vl", "smolvlm")

_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
          r"\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """One byte-level BPE holding every control token the TRL templates write (as special tokens), trained on the
    test conversations, so each template's tokens are single ids as in the real model's vocabulary."""
    specials = sorted({t for name in TEMPLATE_NAMES
                       for t in written_control_tokens((TRL_TEMPLATES / f"{name}.jinja").read_text())})
    specials += ["<s>", "</s>", "<pad>"]
    corpus = [json.dumps(c) for c in CONVERSATIONS.values()] + [json.dumps(TOOLS)]
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus * 20, trainer=trainers.BpeTrainer(
        vocab_size=700, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials]))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>", "<tool_call>")])
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return path


def _folder(tokenizer_json, root: Path, name: str, **config) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(tokenizer_json, d / "tokenizer.json")
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
              "tokenizer_class": "PreTrainedTokenizerFast", **config}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def _pair(tokenizer_json, root: Path, name: str):
    d = _folder(tokenizer_json, root, name, chat_template=(TRL_TEMPLATES / f"{name}.jinja").read_text())
    return Tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)


def _cases(source: str):
    """(conversation name, messages, add_generation_prompt, tools, template kwargs) for one template."""
    variants = [{}] + ([{"enable_thinking": False}] if "enable_thinking" in source else [])
    for name, conv in CONVERSATIONS.items():
        last_prompt = max(i for i, m in enumerate(conv) if m["role"] != "assistant")
        tools = TOOLS if name == "tools" else None
        for gen in (False, True):
            for kw in variants:
                yield name, conv[:last_prompt + 1] if gen else conv, gen, tools, kw


def _render_both(ours, hf, msgs, gen, tools, kw):
    out = []
    for fn in (lambda: ours.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False, tools=tools, **kw),
               lambda: hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False, tools=tools, **kw)):
        try:
            out.append(fn())
        except Exception as e:  # noqa: BLE001 -- a template may reject a conversation; both must then reject it
            out.append(e)
    return out


def _check_prefix_mask(hf, msgs, tools, kw, ids, mask) -> int:
    """Prefix-derived mask vs token prefixes rendered by transformers: where ``messages[:i]`` + generation prompt and
    ``messages[:i+1]`` tokenise to prefixes of the conversation, the mask is 0 up to the first and 1 between them.
    Elsewhere (a turn rendered differently when last) each assistant content is inside a masked run. Returns the
    number of turns checked exactly."""
    exact, prev = 0, 0  # prev: where the previous assistant turn ends (None: not a prefix, unknown)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        p = hf.apply_chat_template(msgs[:i], add_generation_prompt=True, tools=tools, return_dict=False, **kw)
        c = hf.apply_chat_template(msgs[:i + 1], tools=tools, return_dict=False, **kw)
        if ids[:len(p)] == p and ids[:len(c)] == c and c[:len(p)] == p:
            if prev is not None:
                assert mask[prev:len(p)] == [0] * (len(p) - prev), f"message {i}: prompt tokens are masked"
            assert mask[len(p):len(c)] == [1] * (len(c) - len(p)), f"message {i}: turn tokens are not all masked"
            exact += 1
        elif isinstance(m.get("content"), str) and m["content"]:
            runs = "".join(hf.decode([t]) if k else "\0" for t, k in zip(ids, mask))
            rendered = hf.decode(ids)
            assert m["content"] not in rendered or any(m["content"] in r for r in runs.split("\0")), \
                f"message {i}: its content is not in a masked run"
        prev = len(c) if ids[:len(c)] == c else None
    return exact


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_trl_template_matches_transformers(tokenizer_json, tmp_path, name):
    ours, hf = _pair(tokenizer_json, tmp_path, name)
    tpl = ours.get_chat_template()
    assert tpl.name == "default"
    compared = rejected = 0
    for conv, msgs, gen, tools, kw in _cases(tpl.source):
        where = f"{name}/{conv}/add_generation_prompt={gen}/{kw}"
        text, theirs = _render_both(ours, hf, msgs, gen, tools, kw)
        if isinstance(theirs, Exception) or isinstance(text, Exception):
            assert isinstance(theirs, Exception) and isinstance(text, ValueError), (where, text, theirs)
            assert "chat template 'default'" in str(text) and "message" in str(text), (where, text)
            rejected += 1
            continue
        assert text == theirs, where
        enc = ours.apply_chat_template(msgs, add_generation_prompt=gen, tools=tools, **kw)
        ref = hf.apply_chat_template(msgs, add_generation_prompt=gen, tools=tools, return_dict=True,
                                     return_assistant_tokens_mask=True, **kw)
        assert enc.input_ids == list(ref["input_ids"]), where
        if tpl.has_generation:
            assert enc.assistant_mask == list(ref["assistant_masks"]), where
        else:
            _check_prefix_mask(hf, msgs, tools, kw, enc.input_ids, enc.assistant_mask)
            if not gen:  # training data: every assistant turn contributes masked tokens
                assert sum(enc.assistant_mask) > 0, where
        compared += 1
    assert compared >= 3, (name, compared, rejected)


@pytest.mark.parametrize("family", SAME_SPAN_FAMILIES)
def test_prefix_masks_equal_trl_training_generation_masks(tokenizer_json, tmp_path, family):
    ours, hf = _pair(tokenizer_json, tmp_path, family)
    training, hf_training = _pair(tokenizer_json, tmp_path, family + "_training")
    assert not ours.get_chat_template().has_generation and training.get_chat_template().has_generation
    compared = 0
    for conv, msgs, gen, tools, kw in _cases(ours.get_chat_template().source):
        a, b = _render_both(ours, hf_training, msgs, gen, tools, kw)
        if isinstance(a, Exception) or a != b or gen:
            continue  # the variants render this conversation differently (or both cannot)
        ref = hf_training.apply_chat_template(msgs, tools=tools, return_dict=True, return_assistant_tokens_mask=True,
                                              **kw)
        assert ours.apply_chat_template(msgs, tools=tools, **kw).assistant_mask == list(ref["assistant_masks"]), conv
        compared += 1
    assert compared >= 3


def test_headline_models(tokenizer_json, tmp_path):
    """The cases the issue found wrong: default system prompt, <think> generation prompt, date header, own tokens."""
    qwen, _ = _pair(tokenizer_json, tmp_path, "qwen2_5")
    assert qwen.apply_chat_template([U1], tokenize=False).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n")
    qwen3, _ = _pair(tokenizer_json, tmp_path, "qwen3")
    assert qwen3.apply_chat_template([U1], add_generation_prompt=True, tokenize=False,
                                     enable_thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    llama, _ = _pair(tokenizer_json, tmp_path, "llama3_1")
    assert "Cutting Knowledge Date: December 2023\nToday Date: " in llama.apply_chat_template([U1], tokenize=False)
    for name, marker in (("phi3", "<|user|>"), ("gemma3", "<start_of_turn>user"),
                         ("deepseek_r1_distill", "<｜User｜>"), ("smolvlm", "User:")):
        tok, _ = _pair(tokenizer_json, tmp_path, name)
        assert marker in tok.apply_chat_template([U1, A1], tokenize=False), name


def test_stop_tokens_of_model_templates(tokenizer_json, tmp_path):
    for name, eot in (("qwen2_5", "<|im_end|>"), ("llama3", "<|eot_id|>"), ("gemma3", "<end_of_turn>"),
                      ("phi3", "<|end|>"), ("deepseek_r1_distill", "<｜end▁of▁sentence｜>")):
        tok, _ = _pair(tokenizer_json, tmp_path, name)
        assert tok.stop_token_ids == [tok.token_to_id(eot), tok.eos_token_id], name


# ------------------------------------------------------------------------------------------- where templates live
def test_named_templates_and_template_files(tokenizer_json, tmp_path):
    qwen = (TRL_TEMPLATES / "qwen2_5.jinja").read_text()
    llama = (TRL_TEMPLATES / "llama3_1.jinja").read_text()
    d = _folder(tokenizer_json, tmp_path, "named", chat_template=[{"name": "default", "template": qwen},
                                                                  {"name": "tool_use", "template": llama}])
    ours, hf = Tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
    assert set(ours.chat_templates) >= {"default", "tool_use", "chatml"} and ours.chat_template == "default"
    for kwargs in ({}, {"tools": TOOLS}, {"chat_template": "tool_use"}):
        ours_kwargs = {("template" if k == "chat_template" else k): v for k, v in kwargs.items()}
        assert ours.apply_chat_template([U1], tokenize=False, **ours_kwargs) == \
            hf.apply_chat_template([U1], tokenize=False, **kwargs)
    assert "Cutting Knowledge" in ours.apply_chat_template([U1], tokenize=False, tools=TOOLS)
    # chat_template.jinja and additional_chat_templates/ beside tokenizer.json win over the config (as in transformers)
    f = _folder(tokenizer_json, tmp_path, "files", chat_template="{{ 'ignored' }}")
    (f / "chat_template.jinja").write_text(qwen)
    (f / "additional_chat_templates").mkdir()
    (f / "additional_chat_templates" / "plain_llama.jinja").write_text(llama)
    ours, hf = Tokenizer(f), transformers.AutoTokenizer.from_pretrained(f)
    assert ours.get_chat_template().origin == str(f / "chat_template.jinja")
    for t in (None, "plain_llama"):
        assert ours.apply_chat_template([U1], tokenize=False, template=t) == \
            hf.apply_chat_template([U1], tokenize=False, chat_template=t)
    with pytest.raises(ValueError, match="unknown chat template 'nope'.*plain_llama"):
        ours.apply_chat_template([U1], template="nope")


def test_documents_and_any_template_variable_reach_the_template(tokenizer_json, tmp_path):
    source = ("{% for d in documents %}[{{ d.title }}: {{ d.text }}]{% endfor %}{{ greeting | default('none') }}"
              "{% for m in messages %}{{ m.role }}={{ m.content | tojson }};{% endfor %}{{ strftime_now('%Y') }}")
    d = _folder(tokenizer_json, tmp_path, "docs", chat_template=source)
    ours, hf = Tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
    docs = [{"title": "Paris", "text": "Capital of France."}, {"title": "Berlin", "text": "Capital of \"Germany\"."}]
    for kw in ({}, {"greeting": "hello"}):
        assert ours.apply_chat_template([U1], tokenize=False, documents=docs, **kw) == \
            hf.apply_chat_template([U1], tokenize=False, documents=docs, **kw)
    with pytest.raises(TypeError, match="documents must be a list of dicts"):
        ours.apply_chat_template([U1], documents="Paris")
    wrapped = Tokenizer.from_tokenizers(RustTokenizer.from_file(str(d / "tokenizer.json")), eos_token="</s>",
                                        chat_template=source)
    assert wrapped.apply_chat_template([U1], tokenize=False, documents=docs) == \
        ours.apply_chat_template([U1], tokenize=False, documents=docs)


def test_save_keeps_the_model_template_and_kwargs(tokenizer_json, tmp_path):
    tok, _ = _pair(tokenizer_json, tmp_path, "qwen3")
    tok.chat_template_kwargs["enable_thinking"] = False
    tok.save(tmp_path / "saved")
    again, hf = Tokenizer(tmp_path / "saved"), transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert again.get_chat_template().source == tok.get_chat_template().source
    assert again.chat_template_kwargs == {"enable_thinking": False}
    prompt = again.apply_chat_template([U1], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<think>\n\n</think>\n\n")  # the stored default reaches every generation prompt
    assert prompt == hf.apply_chat_template([U1], add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert again.apply_chat_template([U1], add_generation_prompt=True, tokenize=False,
                                     enable_thinking=True).endswith("<|im_start|>assistant\n")  # a call overrides


# ------------------------------------------------------------------------------------------------------ bad input
def test_sandbox_blocks_code_execution(tokenizer_json, tmp_path):
    tok, _ = _pair(tokenizer_json, tmp_path, "llama3")
    for source in ("{{ ''.__class__.__mro__[1].__subclasses__() }}",
                   "{{ cycler.__init__.__globals__.os.system('touch /tmp/pwned') }}",
                   "{{ messages.append({'role': 'user'}) }}",
                   "{% set ns = namespace(_secret=1) %}{{ ns }}"):
        with pytest.raises(ChatTemplateError, match="chat template 'custom'.*(sandbox|unsafe|undefined|Undefined)"):
            tok.apply_chat_template([U1], template=source)
    assert not Path("/tmp/pwned").exists()
    with pytest.raises(ChatTemplateError, match="syntax error at line 1"):
        tok.apply_chat_template([U1], template="{% for m in messages %}")


def test_raise_exception_names_template_and_message(tokenizer_json, tmp_path):
    tok, _ = _pair(tokenizer_json, tmp_path, "gemma3")
    with pytest.raises(ChatTemplateError, match=r"chat template 'default' from .*gemma3.*tokenizer_config\.json.* "
                                                r"failed at message 3 \(role 'user'\): Conversation roles must "
                                                r"alternate"):
        tok.apply_chat_template([U1, A1, U2, U2, A2])


def test_missing_control_token_names_template_and_message(tokenizer_json, tmp_path):
    bare = RustTokenizer.from_file(str(tokenizer_json))
    d = tmp_path / "lacking"
    d.mkdir()
    # a vocabulary without Qwen's tokens: the template's <|im_start|> would be split into pieces
    vocab, merges = json.loads(bare.to_str())["model"]["vocab"], []
    small = RustTokenizer(models.BPE(vocab={k: v for k, v in vocab.items() if len(k) == 1}, merges=merges))
    small.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    small.add_special_tokens([AddedToken("</s>", special=True)])
    small.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "</s>", "chat_template": (TRL_TEMPLATES / "qwen2_5.jinja").read_text()}))
    tok = Tokenizer(d)
    assert "<|im_start|>" in tok.apply_chat_template([U1], tokenize=False)  # rendering alone is fine
    with pytest.raises(ChatTemplateError, match=r"chat template 'default' .* needs the special tokens "
                                                r"\['<\|im_end\|>', '<\|im_start\|>'\].* first for message 0"):
        tok.apply_chat_template([U1, A1])


def test_unsplittable_template_names_the_turn(tokenizer_json, tmp_path):
    # an earlier assistant turn renders as its content's length: nothing in it can locate where it ends
    source = ("{% for m in messages %}{% if m.role == 'assistant' %}{{ 'A:' }}"
              "{% if loop.last %}{{ m.content }}{% else %}{{ m.content | length }}{% endif %}"
              "{% else %}{{ 'U:' + m.content }}{% endif %}{{ '\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ 'A:' }}{% endif %}")
    tok, _ = _pair(tokenizer_json, tmp_path, "llama3")
    assert tok.apply_chat_template([U1, A1], template=source).assistant_mask[-1] == 1  # last turn: fine
    with pytest.raises(ChatTemplateError, match=r"cannot be split into turns at message 1 \(role 'assistant'\)"):
        tok.apply_chat_template([U1, A1, U2, A2], template=source)


# ----------------------------------------------------------------------------------------------------- reasoning
def _trained(tok, enc) -> list[str]:
    runs, cur = [], []
    for t, m in zip(enc.input_ids, enc.assistant_mask):
        if m:
            cur.append(t)
        elif cur:
            runs, cur = runs + [tok.decode(cur, skip_special_tokens=False)], []
    return runs + ([tok.decode(cur, skip_special_tokens=False)] if cur else [])


def test_reasoning_history(tokenizer_json, tmp_path):
    conv = CONVERSATIONS["reasoning"]
    qwen3, hf = _pair(tokenizer_json, tmp_path, "qwen3")
    # as the template does: Qwen3 drops the reasoning of turns before the last user message
    enc = qwen3.apply_chat_template(conv)
    assert _trained(qwen3, enc) == ["The capital of France is Paris.<|im_end|>\n",
                                    "<think>\nGermany's capital is Berlin.\n</think>\n\nBerlin.<|im_end|>\n"]
    assert enc.input_ids == hf.apply_chat_template(conv, return_dict=False)
    # keep: every turn rendered as when it was the last message, reasoning included and trained
    keep = qwen3.apply_chat_template(conv, reasoning_history="keep")
    assert _trained(qwen3, keep) == [
        "<think>\nFrance's capital city is Paris.\n</think>\n\nThe capital of France is Paris.<|im_end|>\n",
        "<think>\nGermany's capital is Berlin.\n</think>\n\nBerlin.<|im_end|>\n"]
    assert qwen3.apply_chat_template(conv, reasoning_history="keep", tokenize=False) == \
        qwen3.decode(keep.input_ids, skip_special_tokens=False)
    # with a template that keeps every turn's reasoning, drop removes earlier turns' reasoning
    training, _ = _pair(tokenizer_json, tmp_path, "qwen3_training")
    assert _trained(training, training.apply_chat_template(conv, reasoning_history="drop"))[0] == \
        "<think>\n\n</think>\n\nThe capital of France is Paris.<|im_end|>\n"
    assert _trained(training, training.apply_chat_template(conv, reasoning_history="keep")) == \
        _trained(training, training.apply_chat_template(conv))
    with pytest.raises(ValueError, match="reasoning_history must be one of"):
        qwen3.apply_chat_template(conv, reasoning_history="sometimes")
    # the model's own keyword for the same thing passes through (Qwen3.6 preserve_thinking)
    q36, hf36 = _pair(tokenizer_json, tmp_path, "qwen3_6")
    text = q36.apply_chat_template(conv, tokenize=False, preserve_thinking=True)
    assert "France's capital city" in text and text == hf36.apply_chat_template(conv, tokenize=False,
                                                                                preserve_thinking=True)


def test_train_config_template_kwargs_reach_the_trainers_prompts(tokenizer_json, tmp_path):
    """``TrainConfig.chat_template_kwargs`` (e.g. Qwen3's enable_thinking) reaches the prompts a trainer renders."""
    from llm_trainer import SFTTrainer, TrainConfig
    from llm_trainer.model import ModelConfig
    from trainer_utils import write_sft
    d = _folder(tokenizer_json, tmp_path, "qwen3", chat_template=(TRL_TEMPLATES / "qwen3.jinja").read_text())
    items = [str(write_sft(tmp_path / "sft", n=8))]
    prompts = {}
    for think in (True, False):
        cfg = TrainConfig(model_config=ModelConfig(vocab_size=Tokenizer(d).vocab_size, hidden_size=32,
                                                   num_hidden_layers=1, num_attention_heads=2,
                                                   max_position_embeddings=64),
                          tokenizer=str(d), chat_template_kwargs={"enable_thinking": think}, file_dataset=items,
                          batch_size=4, max_steps=1, output_dir=str(tmp_path / f"o{think}"), dtype="fp32")
        tr = SFTTrainer(train_config=cfg)
        prompts[think] = tr.tokenizer.decode(tr.format_eval_prompt("hi"), skip_special_tokens=False)
    assert prompts[False].endswith("<think>\n\n</think>\n\n") and not prompts[True].endswith("</think>\n\n")
