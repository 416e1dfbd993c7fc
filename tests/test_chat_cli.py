"""`llm-trainer chat` run for real: stdin from a pipe (answers, multi-turn history, /reset, system prompt, VLM
images) and from a pseudo-terminal (answers stream: Ctrl-C stops one mid-way and the chat goes on)."""
from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import termios

import pytest
import torch

from llm_trainer.generation import GenerateConfig, generate
from llm_trainer.serve.loading import load_served_model
from serve_models import cli_env, make_llm_folder, make_reward_folder, make_vlm_folder
from test_serve_vlm import picture

N = 20


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_llm_folder(tmp_path_factory.mktemp("chat") / "tiny")


def chat(folder, stdin: str, *args: str) -> subprocess.CompletedProcess:
    env = {**cli_env(), "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "llm_trainer.cli.main", "chat", str(folder), "--threads", "1",
                           *args], input=stdin.encode(), capture_output=True, env=env, timeout=300)


def greedy_reply(served, messages, images=(), n=N) -> str:
    prompt = served.chat_prompt(messages, images)
    out = generate(served.model, [prompt.ids], GenerateConfig(max_new_tokens=n, do_sample=False),
                   eos_token_ids=served.stop_token_ids, pixel_values=prompt.pixel_values)
    return served.tokenizer.decode(out.completions[0])


def test_pipe_multi_turn_reset_and_system_prompt(folder):
    served = load_served_model(folder)
    system = {"role": "system", "content": "Be brief."}
    u1, u2 = {"role": "user", "content": "hello"}, {"role": "user", "content": "How are you?"}
    a1 = greedy_reply(served, [system, u1])
    a2 = greedy_reply(served, [system, u1, {"role": "assistant", "content": a1}, u2])
    without_history = greedy_reply(served, [system, u2])
    assert a2 != without_history  # the second answer really depends on the first turn
    r = chat(folder, "hello\nHow are you?\n/reset\nhello\n\n/help\n/image x.png\n", "--greedy",
             "--max-new-tokens", str(N), "--system", "Be brief.")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode() == f"{a1}\n{a2}\n{a1}\n"
    err = r.stderr.decode()
    assert "[conversation cleared]" in err and "/reset" in err and "text model" in err


def test_sampling_options_and_seed(folder):
    served = load_served_model(folder)
    prompt = served.chat_prompt([{"role": "user", "content": "hi"}])
    config = GenerateConfig(max_new_tokens=N, temperature=0.8, top_k=30, top_p=0.9, repetition_penalty=1.1)
    out = generate(served.model, [prompt.ids], config, eos_token_ids=served.stop_token_ids,
                   generator=torch.Generator().manual_seed(5))
    r = chat(folder, "hi\n", "--max-new-tokens", str(N), "--temperature", "0.8", "--top-k", "30", "--top-p", "0.9",
             "--repetition-penalty", "1.1", "--seed", "5")
    assert r.returncode == 0 and r.stdout.decode() == served.tokenizer.decode(out.completions[0]) + "\n"


def test_vlm_chat_with_image(tmp_path):
    folder = make_vlm_folder(tmp_path / "vlm")
    served = load_served_model(folder)
    picture(3).save(tmp_path / "a.png")
    picture(4).save(tmp_path / "b.png")
    msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}]
    a1 = greedy_reply(served, msg, [str(tmp_path / "a.png")])
    turn2 = [*msg, {"role": "assistant", "content": a1},
             {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and this?"}]}]
    a2 = greedy_reply(served, turn2, [str(tmp_path / "a.png"), str(tmp_path / "b.png")])
    r = chat(folder, f"what is it?\n/image {tmp_path / 'b.png'}\nand this?\n", "--greedy", "--max-new-tokens", str(N),
             "--image", str(tmp_path / "a.png"))
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode() == f"{a1}\n{a2}\n"


def test_errors_are_reported(tmp_path, folder):
    rm = make_reward_folder(tmp_path / "rm")
    r = chat(rm, "hi\n")
    assert r.returncode == 2 and b"reward model" in r.stderr
    r = chat(tmp_path / "nothing", "hi\n")
    assert r.returncode == 2 and b"does not exist" in r.stderr


def _read_until(fd, marker: bytes, buf: bytearray, start: int = 0, min_bytes: int = 0) -> None:
    """Read the terminal into ``buf`` until ``marker`` occurs after ``start`` (and ``min_bytes`` arrived there)."""
    while marker not in buf[start:] or len(buf) - start < min_bytes:
        ready, _, _ = select.select([fd], [], [], 120)
        assert ready, f"no {marker!r} in {bytes(buf)!r}"
        try:
            buf += os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            raise AssertionError(f"no {marker!r} in {bytes(buf)!r}") from None


def test_terminal_streams_and_ctrl_c_stops_an_answer(folder):
    """In a real terminal the answer appears while it is generated: after its first bytes arrive, Ctrl-C (the
    terminal's interrupt character) stops it, the partial answer stays, and the chat continues."""
    served = load_served_model(folder)
    pid, fd = pty.fork()
    if pid == 0:  # the child: raw output (no \n → \r\n), no echo of what is typed, then the chat
        attrs = termios.tcgetattr(0)
        attrs[1] &= ~termios.OPOST
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(0, termios.TCSANOW, attrs)
        os.execvpe(sys.executable, [sys.executable, "-m", "llm_trainer.cli.main", "chat", str(folder), "--greedy",
                                    "--threads", "1", "--max-new-tokens", "4000"], cli_env())
    out = bytearray()
    try:
        _read_until(fd, b"> ", out)
        start = out.index(b"> ") + 2
        os.write(fd, b"hello\n")
        _read_until(fd, b"", out, start, min_bytes=12)  # the first pieces of a 4000-token answer
        os.write(fd, b"\x03")
        _read_until(fd, b"[interrupted]", out)
        _read_until(fd, b"> ", out, out.index(b"[interrupted]"))
        partial = bytes(out[start:out.index(b"\n[interrupted]")])
        os.write(fd, b"/exit\n")
        _, status = os.waitpid(pid, 0)
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    reference = greedy_reply(served, [{"role": "user", "content": "hello"}], n=300).encode()
    assert len(partial) >= 12  # bytes: a multi-byte character counts by its bytes, as the terminal received it
    assert reference.startswith(partial) or partial.startswith(reference)
