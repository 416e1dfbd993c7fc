"""Launcher environment parsing, backend selection and the single-process backend (no process group)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_scripts"))
from common import MICRO, TinyLM, init_state, make_optimizer, max_diff, reference_run, train_steps  # noqa: E402

from llm_trainer.parallel import DsConfig, SingleBackend, get_backend, normalize_dtype  # noqa: E402
from llm_trainer.parallel.env import DistEnv, read_env  # noqa: E402


def test_read_env_defaults_and_values():
    assert read_env({}) == DistEnv()
    e = read_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                  "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29501"})
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size) == (3, 4, 1, 2)
    assert (e.master_addr, e.master_port, e.num_nodes, e.is_distributed, e.is_main) == ("10.0.0.1", 29501, 2,
                                                                                        True, False)
    assert read_env({"RANK": "1", "WORLD_SIZE": "2"}).local_rank == 1  # LOCAL_RANK defaults to RANK


@pytest.mark.parametrize("environ", [
    {"WORLD_SIZE": "two"}, {"RANK": "2", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "0"},
    {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"},
    {"MASTER_PORT": "70000"},
])
def test_read_env_rejects_garbage(environ):
    with pytest.raises(ValueError):
        read_env(environ)


def test_only_env_module_reads_launcher_variables():
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "llm_trainer", "parallel")
    for name in os.listdir(root):
        if name.endswith(".py") and name != "env.py":
            text = open(os.path.join(root, name)).read()
            assert "os.environ" not in text and "getenv" not in text, name


def test_normalize_dtype():
    assert normalize_dtype(torch.bfloat16) == normalize_dtype("bfloat16") == "bf16"
    assert normalize_dtype(None) == normalize_dtype("float32") == "fp32"
    with pytest.raises(ValueError):
        normalize_dtype("int8")


def test_get_backend_picks_single_without_launcher():
    env = DistEnv()
    assert isinstance(get_backend(env=env), SingleBackend)
    b = get_backend(DsConfig(), env=env)  # one process: ds_config only chooses the dtype
    assert isinstance(b, SingleBackend) and b.dtype == "bf16"
    assert get_backend(env=env, dtype="fp16").dtype == "fp16"
    with pytest.raises(ValueError):
        get_backend(env=env, kind="fsdp")


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_single_backend_matches_reference(optim):
    """world_size 1 through the Backend == the plain loop (the loop code the distributed tests use)."""
    backend = SingleBackend("fp32", device="cpu")
    model = TinyLM()
    model.load_state_dict(init_state())
    model = backend.wrap(model, make_optimizer(optim, model.parameters()), micro_batch_size=MICRO, grad_accum=3)
    norms = train_steps(backend, model, 3, 3, 0.8)
    ref, ref_norms = reference_run(1, 3, 3, optim, 0.8)
    assert max_diff(backend.full_state_dict(), ref) <= 1e-6
    assert norms == pytest.approx(ref_norms, rel=1e-6)
    assert backend.is_main and backend.world_size == 1 and backend.rank == 0
    with backend.gathered_for_generation() as plain:
        assert plain is model


def test_single_backend_save_load_roundtrip(tmp_path):
    def fresh(seed):
        torch.manual_seed(seed)
        b = SingleBackend("fp32", device="cpu")
        m = TinyLM()
        return b, b.wrap(m, make_optimizer("adamw", m.parameters()))

    b1, m1 = fresh(0)
    train_steps(b1, m1, 2, 2, 1.0)
    b1.save(str(tmp_path / "ck"), {"step": 2, "t": torch.arange(3), "nested": {"a": [1, "x"]}})
    b2, m2 = fresh(1)
    client = b2.load(str(tmp_path / "ck"))
    assert client["step"] == 2 and torch.equal(client["t"], torch.arange(3)) and client["nested"] == {"a": [1, "x"]}
    assert max_diff(b1.full_state_dict(), b2.full_state_dict()) == 0.0
    train_steps(b1, m1, 1, 2, 1.0, first_step=2)
    train_steps(b2, m2, 1, 2, 1.0, first_step=2)
    assert max_diff(b1.full_state_dict(), b2.full_state_dict()) == 0.0  # optimizer state restored too
    with pytest.raises(FileNotFoundError):
        b2.load(str(tmp_path / "missing"))


def test_bf16_autocast_and_fp16_scaler_on_cpu():
    b = SingleBackend("bf16", device="cpu")
    m = b.wrap(TinyLM(), None)
    with b.autocast():
        assert m(torch.zeros(1, 4, dtype=torch.long)).dtype == torch.bfloat16
    assert next(m.parameters()).dtype == torch.float32  # weights stay fp32
    b16 = SingleBackend("fp16", device="cpu")
    assert b16.scaler is not None
    model = TinyLM()
    model = b16.wrap(model, make_optimizer("sgd", model.parameters()))
    norms = train_steps(b16, model, 2, 2, 1.0)
    assert all(n is not None and n == n for n in norms)  # unscaled before clipping: finite, not x65536


def test_step_inside_no_sync_is_an_error():
    b = SingleBackend("fp32", device="cpu")
    model = TinyLM()
    b.wrap(model, make_optimizer("sgd", model.parameters()))
    with pytest.raises(RuntimeError):
        with b.no_sync():
            b.step()


# -- frozen replicas and the output projection (one process) -----------------------------------------------------
def _tiny_llm(tied: bool):
    from llm_trainer.model import LlmModel, ModelConfig
    torch.manual_seed(3)
    return LlmModel(ModelConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, tie_word_embeddings=tied))


def test_frozen_replica_from_source_and_build():
    backend = SingleBackend("fp32", device="cpu")
    model = _tiny_llm(False)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))      # a wrapper's hook must not reach the replica
    wrapped = backend.wrap(model, make_optimizer("sgd", model.parameters()))
    replica = backend.frozen_replica(source=wrapped)
    assert not replica.training and not any(p.requires_grad for p in replica.parameters())
    ids = torch.randint(0, 48, (2, 7))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        calls.clear()
        assert torch.equal(replica(input_ids=ids).logits, want) and calls == []
        model.lm_head.weight.add_(1.0)                            # the source trains on; the copy does not follow
        assert torch.equal(replica(input_ids=ids).logits, want)
    built = backend.frozen_replica(build=lambda: _tiny_llm(True).to(torch.bfloat16))
    assert {p.dtype for p in built.parameters()} == {torch.float32}   # torch backends: fp32 params + autocast
    assert not built.training and not any(p.requires_grad for p in built.parameters())


@pytest.mark.parametrize("kwargs, error", [({}, ValueError), ({"source": TinyLM(), "build": TinyLM}, ValueError),
                                           ({"build": lambda: None}, TypeError), ({"source": "model"}, TypeError)])
def test_frozen_replica_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error):
        SingleBackend("fp32", device="cpu").frozen_replica(**kwargs)


@pytest.mark.parametrize("tied", [False, True])
def test_output_projection_gradients_match_full_logits(tied):
    """Chunked CE through output_projection == CE of the full logits, in value and in every gradient."""
    backend = SingleBackend("fp32", device="cpu")
    ids, labels = torch.randint(0, 48, (2, 9)), torch.randint(0, 48, (2, 9))
    grads = []
    for chunked in (False, True):
        model = _tiny_llm(tied)
        if chunked:
            hidden = model(input_ids=ids, return_hidden_states=True).hidden_states.reshape(-1, 32)
            with backend.output_projection(model) as project:
                loss = sum(torch.nn.functional.cross_entropy(project(hidden[s:s + 4]), labels.reshape(-1)[s:s + 4],
                                                             reduction="sum") for s in range(0, 18, 4))
        else:
            logits = model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 48), labels.reshape(-1), reduction="sum")
        loss.backward()
        grads.append((float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (full_loss, full), (chunk_loss, chunk) = grads
    assert chunk_loss == pytest.approx(full_loss, rel=1e-6)
    assert max_diff(chunk, full) <= 1e-6


def test_output_projection_needs_a_language_model_head():
    with pytest.raises(TypeError, match="lm_head"):
        with SingleBackend("fp32", device="cpu").output_projection(torch.nn.Linear(2, 2)):
            pass
