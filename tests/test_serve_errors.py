"""Bad input against a real `llm-trainer serve` process: malformed requests get OpenAI-style error JSON with a 4xx
status, over-long prompts are refused naming the limit, a client that disconnects (streaming, waiting, or
non-streaming) frees its slot, and the server keeps answering after every one of them."""
from __future__ import annotations

import http.client
import json
import socket
import time

import openai
import pytest

from serve_models import ServerProcess, make_llm_folder


LIMIT = 4096
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = make_llm_folder(tmp_path_factory.mktemp("serve_errors") / "tiny")
    srv = ServerProcess(folder, "--max-batch", "1", "--max-body-mb", "1", "--max-model-len", str(LIMIT))
    yield srv
    err = srv.stop()
    assert "Traceback" not in err, err  # no request ever reached an unexpected failure


def post(server, path, body, raw: bytes | None = None, method="POST", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request(method, path, body=data if method == "POST" else None,
                 headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    return r.status, json.loads(payload)


def raw_exchange(server, data: bytes, shut_write: bool = False) -> tuple[int, dict]:
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(data)
        if shut_write:
            s.shutdown(socket.SHUT_WR)
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
            head, sep, body = buf.partition(b"\r\n\r\n")
            if sep:
                length = [int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")]
                if length and len(body) >= length[0]:
                    break
    status = int(buf.split(b" ", 2)[1])
    return status, json.loads(buf.partition(b"\r\n\r\n")[2])


def assert_error(status, body, expected_status, *words):
    assert status == expected_status, (status, body)
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    for w in words:
        assert w in err["message"] or w == err["param"] or w == err["code"], (w, err)


def assert_alive(server):
    status, body = post(server, CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                       "temperature": 0})
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant", body


MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body,status,words", [
    ([1, 2], 400, ["JSON object"]),
    ({}, 400, ["messages"]),
    ({"messages": []}, 400, ["messages"]),
    ({"messages": "hi"}, 400, ["messages"]),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, ["messages[0].role"]),
    ({"messages": [{"role": "user", "content": 5}]}, 400, ["messages[0].content"]),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, ["messages[0].content[0]"]),
    ({"messages": MSG, "temperature": "hot"}, 400, ["temperature"]),
    ({"messages": MSG, "temperature": 3}, 400, ["temperature"]),
    ({"messages": MSG, "top_p": 0}, 400, ["top_p"]),
    ({"messages": MSG, "max_tokens": 0}, 400, ["max_tokens"]),
    ({"messages": MSG, "max_tokens": 2.5}, 400, ["max_tokens"]),
    ({"messages": MSG, "n": 99}, 400, ["n"]),
    ({"messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, 400, ["stop"]),
    ({"messages": MSG, "stream": "yes"}, 400, ["stream"]),
    ({"messages": MSG, "stream_options": {"include_usage": True}}, 400, ["stream_options"]),
    ({"messages": MSG, "frobnicate": 1}, 400, ["frobnicate", "unrecognized"]),
    ({"messages": MSG, "logprobs": True}, 400, ["logprobs", "unsupported_parameter"]),
    ({"messages": MSG, "tools": [{"type": "function"}]}, 400, ["tools"]),
    ({"messages": MSG, "model": "gpt-4"}, 404, ["model_not_found", "gpt-4"]),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]},
     400, ["text model"]),
])
def test_malformed_chat_requests(server, body, status, words):
    assert_error(*post(server, CHAT, body), status, *words)


def test_malformed_completion_and_reward_requests(server):
    assert_error(*post(server, "/v1/completions", {"prompt": [1, 2, 10 ** 6]}), 400, "prompt", "10")
    assert_error(*post(server, "/v1/completions", {"prompt": []}), 400, "prompt")
    assert_error(*post(server, "/v1/completions", {"prompt": "x", "echo": True}), 400, "echo")
    assert_error(*post(server, "/v1/rewards", {"input": "x"}), 400, "unsupported_endpoint", "reward")


def test_malformed_http(server):
    assert_error(*post(server, CHAT, None, raw=b"{not json"), 400, "invalid_json")
    assert_error(*post(server, CHAT, None, raw=b"\xff\xfe\x00"), 400, "invalid_json")
    assert_error(*post(server, "/v1/nothing", {}), 404, "not_found")
    assert_error(*post(server, CHAT, None, method="GET"), 405, "method_not_allowed")
    assert_error(*post(server, "/v1/models", {}), 405, "method_not_allowed")
    assert_error(*raw_exchange(server, b"GARBAGE\r\n\r\n"), 400)
    assert_error(*raw_exchange(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n"), 411, "Content-Length")
    assert_error(*raw_exchange(server, b"POST /v1/completions HTTP/1.1\r\nContent-Length: abc\r\n\r\n"), 400)
    assert_error(*raw_exchange(server, b"POST /v1/completions HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n"),
                 413, "request_too_large")
    assert_error(*raw_exchange(server, b"POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"pro",
                               shut_write=True), 400, "ended after")
    assert_alive(server)


def test_over_long_prompts_name_the_limit(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    long_text = " ".join(f"w{i}" for i in range(LIMIT))  # well over LIMIT tokens
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": long_text}])
    assert f"maximum context length is {LIMIT} tokens" in str(e.value)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:  # the prompt fits, prompt + max_tokens does not
        client.chat.completions.create(model="tiny", messages=MSG, max_tokens=LIMIT)
    assert f"maximum context length is {LIMIT} tokens" in str(e.value) and "in the completion" in str(e.value)
    status, body = post(server, "/v1/completions", {"prompt": [5] * (LIMIT + 1), "max_tokens": 1})
    assert_error(status, body, 400, "context_length_exceeded", str(LIMIT))
    assert_alive(server)


def _open_stream(server, max_tokens=LIMIT - 100, stream=True) -> socket.socket:
    body = json.dumps({"messages": MSG, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
                       "ignore_eos": True}).encode()
    s = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return s


def test_disconnects_free_their_slots(server):
    """One slot (--max-batch 1): a long stream holds it, a second request waits. Both clients hang up; a third
    request then gets the slot, and the server counts both as cancelled."""
    base = server.health()
    streaming = _open_stream(server)
    data = b""
    while data.count(b"data: ") < 4:  # a few events have arrived: it is decoding
        data += streaming.recv(4096)
    assert b"200 OK" in data
    waiting = _open_stream(server, stream=False)
    server.wait_until(lambda h: h["waiting"] == 1 and h["running"] == 1, "one running, one waiting")
    waiting.close()
    streaming.close()
    h = server.wait_until(lambda h: h["running"] == 0 and h["cancelled"] - base["cancelled"] == 2,
                          "both disconnected sequences cancelled")
    assert h["generated_tokens"] - base["generated_tokens"] < LIMIT - 100  # the stream was cut short
    assert_alive(server)


def test_non_streaming_client_disconnect(server):
    base = server.health()
    s = _open_stream(server, stream=False)
    server.wait_until(lambda h: h["running"] == 1, "the request is decoding")
    time.sleep(0.05)
    s.close()
    h = server.wait_until(lambda h: h["running"] == 0 and h["cancelled"] - base["cancelled"] == 1,
                          "the abandoned request cancelled")
    assert h["completed"] == base["completed"]
    assert_alive(server)


def test_odd_but_valid_http(server):
    """An unknown method, deeply nested JSON, and an HTTP/1.0 client streaming (no chunked encoding for it)."""
    assert_error(*raw_exchange(server, b"FOO /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"), 405)
    assert_error(*post(server, CHAT, None, raw=b"[" * 100_000 + b"]" * 100_000), 400, "invalid_json")
    body = json.dumps({"messages": MSG, "max_tokens": 5, "temperature": 0, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        data = b""
        while chunk := s.recv(65536):  # the server closes the connection at the end of the stream
            data += chunk
    head, _, events = data.partition(b"\r\n\r\n")
    assert b"200 OK" in head and b"chunked" not in head.lower()
    assert events.startswith(b"data: {") and events.endswith(b"data: [DONE]\n\n")
    assert_alive(server)
