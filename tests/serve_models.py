"""Tiny model folders for the serving tests (`test_serve*.py`, `test_chat_cli.py`): a byte-level BPE tokenizer
trained here, and random `LlmModel` / `VlmModel` / `RewardModel` / `SequenceClassifier` folders saved next to it."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello there! How are you today?",
          "Numbers: 12 + 7 = 19, 3 * 4 = 12.", "A small model answers small questions.",
          "Ünïcödé text — naïve café, 東京, emoji 🙂."]


def make_tokenizer(out: Path):
    from llm_trainer.tokenizer import Tokenizer, train_tokenizer

    corpus = out.parent / f"{out.name}_corpus.txt"
    corpus.write_text("\n".join(CORPUS * 20), encoding="utf-8")
    train_tokenizer([corpus], 300, out, template="chatml", added_tokens=["<image>"], show_progress=False)
    return Tokenizer(out)


def llm_config(vocab_size: int, **kw):
    from llm_trainer.model import ModelConfig

    base = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.2,
                tie_word_embeddings=False)
    base.update(kw)
    return ModelConfig(**base)


def make_llm_folder(out: Path, seed: int = 0, **kw) -> Path:
    from llm_trainer.model import LlmModel

    tok = make_tokenizer(out)
    torch.manual_seed(seed)
    LlmModel(llm_config(tok.vocab_size, **kw)).save_pretrained(out)
    tok.save(out)
    return out


def make_vlm_folder(out: Path, seed: int = 0) -> Path:
    from llm_trainer.model.vision import VisionConfig
    from llm_trainer.model.vlm import VLMConfig, VlmModel

    tok = make_tokenizer(out)
    torch.manual_seed(seed)
    vision = VisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2)
    cfg = VLMConfig.from_llm_config(llm_config(tok.vocab_size), vision_config=vision,
                                    image_token_id=tok.image_token_id, tokens_per_image=4)
    VlmModel(cfg).save_pretrained(out)
    tok.save(out)
    return out


def make_reward_folder(out: Path, seed: int = 0) -> Path:
    from llm_trainer.trainers.reward import RewardModel

    tok = make_tokenizer(out)
    torch.manual_seed(seed)
    model = RewardModel(llm_config(tok.vocab_size))
    with torch.no_grad():
        model.score_head.bias.fill_(0.25)
    model.save_pretrained(out)
    tok.save(out)
    return out


def make_classifier_folder(out: Path, seed: int = 0) -> Path:
    """A 3-class ``Qwen2ForSequenceClassification``-style folder with named labels."""
    from llm_trainer.model.heads import SequenceClassifier

    tok = make_tokenizer(out)
    torch.manual_seed(seed)
    model = SequenceClassifier(llm_config(tok.vocab_size, architecture="qwen2", attention_bias=True), 3,
                               ["negative", "neutral", "positive"], head_init_std=1.0)
    model.save_pretrained(out, pad_token_id=tok.pad_token_id)
    tok.save(out)
    return out


def post_json(server: "ServerProcess", body, path: str = "/v1/rewards") -> tuple[int, dict]:
    """POST ``body`` as JSON to the server over a real socket; (status, parsed JSON answer)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    out = r.status, json.loads(r.read())
    conn.close()
    return out


def post_concurrently(server: "ServerProcess", bodies: list, path: str = "/v1/rewards") -> list[tuple[int, dict]]:
    """POST every body at once, one client thread each; the answers in the bodies' order."""
    import threading

    results: list = [None] * len(bodies)

    def ask(i: int) -> None:
        results[i] = post_json(server, bodies[i], path)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class ServerProcess:
    """`llm-trainer serve` in a subprocess on a free loopback port (the port is read from its first line)."""

    def __init__(self, folder: Path, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llm_trainer.cli.main", "serve", str(folder), "--host", "127.0.0.1", "--port", "0",
             "--threads", "1", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
        line = self.proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()}")
        self.port = int(m.group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def health(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(self.url + "/health", timeout=30) as r:
            return json.loads(r.read())

    def wait_until(self, predicate, what: str, timeout: float = 60.0) -> dict:
        """Poll /health until ``predicate(health)`` (a generous deadline; not a timing assertion)."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if predicate(h):
                return h
            if time.monotonic() > deadline:
                raise AssertionError(f"server never reached: {what}; last /health: {h}")
            time.sleep(0.05)

    def stop(self) -> str:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err
