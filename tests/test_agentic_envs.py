"""Environments for multi-turn RL (llm_trainer.envs): tool-call parsing against the chat templates' own renderings,
tools run with time/output limits, the tool environment's error turns, appended environment turns as token ids
(against the templates: the trajectory equals the rendered conversation's ids where the reply is canonical), and the
episode runner (token-in/token-out trajectories, loss masks, limits, batches mixing turns, failures named)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from agentic_helpers import CountdownEnv, chatml_tokenizer, template_tokenizer, trl_template  # noqa: E402

from llm_trainer.envs import (Episode, EpisodeLimits, EnvironmentFailure, StepResult, Tool, ToolEnvironment,  # noqa: E402
                              ToolRunner, TurnEncoder, calculator, detect_format, parse_tool_calls, run_episodes)
from llm_trainer.envs.episodes import episode_stats  # noqa: E402
from llm_trainer.trainers.rollout import GenerationResult  # noqa: E402

ADD_CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 964, "b": 494}}}


# ----------------------------------------------------------------------------------------------- tool calls
@pytest.mark.parametrize("name,fmt", [("qwen2_5", "hermes"), ("qwen3", "hermes"), ("llama3_1", "llama3_json"),
                                      ("llama3_2", "llama3_json")])
def test_parsing_the_templates_own_rendering_of_a_tool_call(tmp_path, name, fmt):
    """Render an assistant message with a tool call with the model's template; the reply text between the generation
    prompt and the end of the turn parses back to the same call."""
    tok = template_tokenizer(tmp_path, name)
    assert detect_format(tok.get_chat_template().source, "default") == fmt
    user = [{"role": "user", "content": "964+494=?"}]
    prompt = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False, tools=[calculator_schema()])
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": "", "tool_calls": [ADD_CALL]}],
                                   tokenize=False, tools=[calculator_schema()])
    assert full.startswith(prompt)
    reply = full[len(prompt):].split(TurnEncoder(tok).end_of_turn([calculator_schema()]))[0]
    parsed = parse_tool_calls(reply, fmt)
    assert parsed.errors == [] and [(c.name, c.arguments) for c in parsed.calls] == [("add", {"a": 964, "b": 494})]


def calculator_schema():
    return Tool.from_function(calculator.add).schema()


def test_hermes_and_llama3_json_parsing():
    text = ('Let me compute.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
            '<tool_call>{"name": "mul", "arguments": "{\\"x\\": 3}"}</tool_call>')
    p = parse_tool_calls(text, "hermes")
    assert p.content == "Let me compute." and p.errors == []
    assert [(c.name, c.arguments) for c in p.calls] == [("add", {"a": 1, "b": 2}), ("mul", {"x": 3})]
    assert p.message()["tool_calls"][0] == {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
    assert parse_tool_calls("The answer is 3.", "hermes").calls == []
    p = parse_tool_calls('{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "neg", "parameters": {"x": 5}}',
                         "llama3_json")
    assert [(c.name, c.arguments) for c in p.calls] == [("add", {"a": 1, "b": 2}), ("neg", {"x": 5})]
    assert parse_tool_calls("It is 3.", "llama3_json").content == "It is 3."


@pytest.mark.parametrize("text,fmt,fragment", [
    ("<tool_call>{'name': 'add'}</tool_call>", "hermes", "not valid JSON"),
    ('<tool_call>{"arguments": {"a": 1}}</tool_call>', "hermes", "has no 'name'"),
    ('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>', "hermes", "must be a JSON object"),
    ('<tool_call>{"name": "add", "arguments": {"a": 1}', "hermes", "unterminated <tool_call>"),
    ('<tool_call>[1, 2]</tool_call>', "hermes", "must be a JSON object with 'name'"),
    ('{"name": "add", "parameters": {"a": 1}', "llama3_json", "not valid JSON"),
])
def test_malformed_tool_calls_are_errors_not_exceptions(text, fmt, fragment):
    p = parse_tool_calls(text, fmt)
    assert p.calls == [] and len(p.errors) == 1 and fragment in p.errors[0], p.errors


@pytest.mark.parametrize("name,what", [("deepseekv3", "DeepSeek"), ("gemma4", "Gemma 4"), ("glm4moe", "GLM-4.5"),
                                       ("qwen3_6", "Qwen3-Coder"), ("lfm2_v2", "LFM2"), ("gptoss", "GPT-OSS")])
def test_unsupported_tool_call_formats_are_named(name, what):
    with pytest.raises(ValueError, match=f"renders {what}.*not supported"):
        detect_format(trl_template(name), name)


def test_a_template_without_tool_calls_needs_an_explicit_format():
    with pytest.raises(ValueError, match="renders no tool calls; pass tool_format="):
        detect_format(trl_template("gemma3"), "gemma3")
    assert detect_format("", "chatml") == "hermes" and detect_format("", "llama3") == "llama3_json"


# ------------------------------------------------------------------------------------------------------ tools
def _slow(seconds: float) -> str:
    """Sleep."""
    time.sleep(seconds)
    return "late"


def _hang() -> str:
    while True:
        pass


def _boom(x: int) -> int:
    raise ZeroDivisionError(f"cannot use {x}")


def _big() -> str:
    return "x" * 100_000


def _die() -> str:
    os._exit(3)


def test_tool_schema_from_the_signature_and_docstring():
    def lookup(city: str, days: int = 1, metric: bool = True) -> dict:
        """Weather forecast.

        More text."""
    assert Tool.from_function(lookup).schema() == {"type": "function", "function": {
        "name": "lookup", "description": "Weather forecast.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                                         "metric": {"type": "boolean"}}, "required": ["city"]}}}


def test_tool_runner_limits_and_errors():
    tools = {f.__name__: Tool.from_function(f) for f in (calculator.add, _hang, _slow, _boom, _big, _die)}
    runner = ToolRunner(list(tools.values()), timeout_s=1.0, max_output_chars=50, calls_per_worker=3)
    run = lambda name, **kw: runner.run(tools[name], kw)  # noqa: E731
    assert (r := run("add", a=2, b=40)).ok and r.output == "42"
    t0 = time.monotonic()
    r = run("_hang")
    assert not r.ok and "timed out after 1 s" in r.output and time.monotonic() - t0 < 5.0    # cut off at its limit
    assert run("add", a=1, b=1).output == "2"                                 # a new worker after the kill
    r = run("_slow", seconds=0.01)
    assert r.ok and r.output == "late"
    r = ToolRunner([tools["_boom"]], timeout_s=1.0, max_output_chars=200).run(tools["_boom"], {"x": 7})
    assert not r.ok and r.output == "tool '_boom' raised ZeroDivisionError: cannot use 7"
    r = run("_big")
    assert r.ok and r.output == "x" * 50 + "... [cut: 100000 characters]"
    r = run("_die")
    assert not r.ok and "stopped without returning a result" in r.output
    assert [run("add", a=i, b=1).output for i in range(5)] == ["1", "2", "3", "4", "5"]   # workers replaced
    r = run("add", a=1, c=2)
    assert not r.ok and r.output.startswith("bad arguments for tool 'add'")
    runner.close()


def test_tool_environment_turns():
    env = ToolEnvironment([calculator.add, _boom], tool_format="hermes", timeout_s=2.0,
                          reward=lambda rec, text: float(text.strip() == rec["answer"]))
    rec = calculator.records(1)[0]
    assert env.reset(rec) == rec["prompt"]
    res = env.step(calculator.tool_call_text(rec["a"], rec["b"]) + '<tool_call>{"name": "nope"}</tool_call>'
                   '<tool_call>{"name": "_boom", "arguments": {"x": 1}}</tool_call><tool_call>oops</tool_call>')
    assert not res.done and res.reward == 0.0
    assert [m["content"] for m in res.observation] == [
        "error: tool call is not valid JSON (Expecting value at character 0): 'oops'", rec["answer"],
        "error: unknown tool 'nope' (tools: ['_boom', 'add'])", "error: tool '_boom' raised ZeroDivisionError: cannot use 1"]
    assert res.info == {"tool_calls": 3, "tool_calls_ok": 1, "tool_errors": 3}
    assert res.assistant["tool_calls"][0]["function"] == {"name": "add", "arguments": {"a": rec["a"], "b": rec["b"]}}
    final = env.step(rec["answer"])
    assert final.done and final.observation is None and final.reward == 1.0
    no_tools = ToolEnvironment([])
    assert no_tools.tools is None
    no_tools.reset(rec)
    assert no_tools.step(calculator.tool_call_text(1, 2)).observation[0]["content"] == \
        "error: unknown tool 'add' (tools: none)"
    many = ToolEnvironment([calculator.add], tool_format="hermes", max_calls_per_turn=1)
    many.reset(rec)
    out = many.step(calculator.tool_call_text(1, 2) * 2).observation
    assert out[0]["content"] == "3" and out[1]["content"].startswith("error: only 1 tool calls per reply are run")


# -------------------------------------------------------------------------------------------- appended turns
@pytest.mark.parametrize("name", ["qwen2_5", "llama3_1", "qwen3", "chatml"])
def test_appended_turns_equal_the_template_rendering(tmp_path, name):
    """Where the reply is the template's own rendering, trajectory = prompt + reply + appended ids equals the ids of
    the whole conversation rendered with the next generation prompt — for two tool rounds. Qwen3 renders a
    generated turn's empty think block only while the turn is last: the trajectory keeps it (what the model saw),
    and the re-rendering is reported."""
    tok = chatml_tokenizer(tmp_path) if name == "chatml" else template_tokenizer(tmp_path, name)
    enc = TurnEncoder(tok)
    tools = [calculator_schema()]
    rec = calculator.records(1)[0]
    call = {"role": "assistant", "content": "", "tool_calls": [ADD_CALL]}
    if name == "chatml":          # the built-in renders no tool_calls: the call is the content
        call = {"role": "assistant", "content": calculator.tool_call_text(964, 494)}
    conv = rec["prompt"] + [call, {"role": "tool", "name": "add", "content": "1458"}, call,
                            {"role": "tool", "name": "add", "content": "1458"}]
    traj = enc.prompt_ids(conv[:1], tools)
    eot = tok.token_to_id(enc.end_of_turn(tools))
    for k in (1, 3):
        rendered = tok.apply_chat_template(conv[:k + 1], tools=tools).input_ids
        reply = rendered[len(traj):rendered.index(eot, len(traj)) + 1]       # the template's rendering of the turn
        traj = traj + reply
        app = enc.append(conv[:k + 1], conv[k + 1:k + 2], traj, tools)
        assert app.prefix_matches == (name != "qwen3" or k == 1)    # Qwen3 re-renders the first turn's think block
        traj = traj + app.ids
        assert app.history_rerendered == (name == "qwen3")
        whole = tok.apply_chat_template(conv[:k + 2], add_generation_prompt=True, tools=tools).input_ids
        if name != "qwen3":
            assert traj == whole, k
        else:   # the same except for the think blocks the template drops from earlier turns
            assert tok.decode(traj, skip_special_tokens=False).replace("<think>\n\n</think>\n\n", "") == \
                tok.decode(whole, skip_special_tokens=False)


def test_appended_turns_keep_a_non_canonical_reply(tmp_path):
    """A reply whose JSON spacing differs from the template's: the appended ids are the same, and the mismatch is
    reported (a decode/re-encode trainer would have trained on other ids)."""
    tok = template_tokenizer(tmp_path, "qwen2_5")
    enc = TurnEncoder(tok)
    prompt = enc.prompt_ids([{"role": "user", "content": "964+494=?"}])
    reply = tok.encode('<tool_call>\n{"name":"add","arguments":{"a":964,"b":494}}\n</tool_call><|im_end|>')
    hist = [{"role": "user", "content": "964+494=?"}, {"role": "assistant", "content": "", "tool_calls": [ADD_CALL]}]
    app = enc.append(hist, [{"role": "tool", "content": "1458"}], prompt + reply)
    assert not app.prefix_matches and not app.history_rerendered
    assert tok.decode(app.ids, skip_special_tokens=False) == \
        "\n<|im_start|>user\n<tool_response>\n1458\n</tool_response><|im_end|>\n<|im_start|>assistant\n"


# -------------------------------------------------------------------------------------------- episode runner
class _Tok:
    """Decodes ids as space-separated numbers; every reply is one token list."""

    @staticmethod
    def decode(ids):
        return " ".join(map(str, ids))


class _Enc:
    """A turn encoder appending [90 + turn] * 2 and recording what it saw."""

    def __init__(self):
        self.seen = []

    def append(self, history, new, trajectory, tools=None):
        self.seen.append(list(trajectory))
        from llm_trainer.envs.turns import Appended
        return Appended([90 + len(history) // 2] * 2, prefix_matches=True, history_rerendered=False)


def _episodes(n, env_factory=lambda: CountdownEnv(3)):
    out = []
    for i in range(n):
        env = env_factory()
        out.append(Episode(i, {"prompt": f"p{i}"}, env, None, env.reset({"prompt": f"p{i}"}), [1, 2, 3 + i]))
    return out


def _scripted(replies):
    """generate(contexts): reply i is replies[len(context) % len(replies)], stopped unless it ends with 0."""
    calls = []

    def gen(contexts):
        calls.append([list(c) for c in contexts])
        comps = [list(replies[len(c) % len(replies)]) for c in contexts]
        return GenerationResult(comps, [torch.full((len(c),), -0.5) for c in comps], [c[-1] != 0 for c in comps])
    return gen, calls


def test_trajectories_are_generated_and_appended_ids_concatenated():
    eps = _episodes(4)
    enc = _Enc()
    gen, calls = _scripted([[7, 8, 2], [9, 2], [5, 5, 5, 2]])
    rounds = run_episodes(eps, gen, enc, _Tok.decode, EpisodeLimits(max_turns=5), batch_size=3)
    assert any(len(set(r)) > 1 for r in rounds)                # batches mixed episodes at different turns
    for e in eps:
        assert e.finished and e.end == "done" and len(e.turns) == 3
        expected = []
        for t in e.turns:                                      # ids = generated + appended, turn after turn
            assert t.start == len(expected)
            expected += t.generated + t.appended
        assert e.ids == expected and e.context == e.prompt_ids + expected
        assert e.loss_mask == [m for t in e.turns for m in [1] * len(t.generated) + [0] * len(t.appended)]
        assert e.logprobs == [x for t in e.turns for x in [-0.5] * len(t.generated) + [0.0] * len(t.appended)]
        assert [m["role"] for m in e.messages] == ["user", "assistant", "user", "assistant", "user", "assistant"]
        assert e.env_reward == sum(float(len(_Tok.decode(t.generated)) % 5) for t in e.turns)
    # every context handed to the generator is the episode's trajectory so far, never re-encoded
    assert all(c in [e.prompt_ids + e.ids[:t.start] for e in eps for t in e.turns] for r in calls for c in r)
    stats = episode_stats(eps)
    assert stats["env/turns"] == 3 and stats["env/finished_frac"] == 1.0 and stats["env/steps"] == 3


def test_episode_limits():
    gen, _ = _scripted([[7, 8, 2]])
    eps = _episodes(1, lambda: CountdownEnv(10))
    run_episodes(eps, gen, _Enc(), _Tok.decode, EpisodeLimits(max_turns=2))
    assert eps[0].end == "max_turns" and not eps[0].finished and len(eps[0].turns) == 2
    eps = _episodes(1, lambda: CountdownEnv(10))
    run_episodes(eps, gen, _Enc(), _Tok.decode, EpisodeLimits(max_turns=9, max_tokens=12))
    assert eps[0].end == "max_tokens" and len(eps[0].context) <= 12 and not eps[0].finished
    gen, _ = _scripted([[7, 8, 0]])                             # never stops: truncated, the env never sees it
    eps = _episodes(1, lambda: CountdownEnv(10))
    run_episodes(eps, gen, _Enc(), _Tok.decode, EpisodeLimits(max_turns=9))
    assert eps[0].end == "truncated" and eps[0].counters == {} and len(eps[0].turns) == 1


class _Broken(CountdownEnv):
    def __init__(self, what):
        super().__init__(5)
        self.what = what

    def step(self, text):
        if self.n == 1:
            if self.what == "raise":
                raise RuntimeError("the simulator crashed")
            if self.what == "nan":
                return [{"role": "user", "content": "x"}], float("nan"), False
            if self.what == "obs":
                return "not a list", 0.0, False
            if self.what == "tuple":
                return None
        return super().step(text)


@pytest.mark.parametrize("what,fragment", [("raise", "RuntimeError: the simulator crashed"),
                                           ("nan", "the reward is not finite"),
                                           ("obs", "the observation must be a list of message dicts"),
                                           ("tuple", "step returned NoneType")])
def test_a_failing_environment_is_named_with_the_episode(what, fragment):
    gen, _ = _scripted([[7, 2]])
    eps = _episodes(3, lambda: _Broken(what))
    with pytest.raises(EnvironmentFailure, match=rf"environment '_Broken' at turn 1 of episode 0 \(record "
                                                 rf"\{{'prompt': 'p0'\}}\): .*{fragment}"):
        run_episodes(eps, gen, _Enc(), _Tok.decode, EpisodeLimits(max_turns=5))


def test_step_result_and_reset_checks():
    from llm_trainer.envs.base import checked_reset

    class NoReset(CountdownEnv):
        def reset(self, record):
            return []
    with pytest.raises(EnvironmentFailure, match="'NoReset' in reset of episode 4.*no messages"):
        checked_reset(NoReset(), {"prompt": "x"}, 4)
    with pytest.raises(EnvironmentFailure, match="reward must be a number"):
        from llm_trainer.envs.base import checked_step

        class Bad(CountdownEnv):
            def step(self, text):
                return StepResult(None, reward="1")
        checked_step(Bad(), "x", {}, 0, 0)
