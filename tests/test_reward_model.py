"""RewardModel / RewardTrainer: Bradley–Terry wiring (with margin) equals an independent computation, the trainer
learns a toy preference, and scores round-trip through save_pretrained / from_pretrained."""
import math

import pytest
import torch

from llm_trainer import ModelConfig, OptimConfig, RewardConfig, TrainConfig
from llm_trainer.data.formats import DataError
from llm_trainer.model.reward import RewardModel, last_token_index
from llm_trainer.trainers.reward import RewardTrainer

# From tests/learning_margins.py (2026-11-28: seeds 42, 0-3, the same on every kernel set and thread count measured;
# docs/benchmarks.md "Learning tests' margins"): held-out accuracy 1.0 on all 16 pairs every time (before: 0.125-0.688),
# margin gain 8.6-11.7. The floors allow 4 of the 16 pairs lost (half-way between a coin flip and 1.0) and half the
# worst margin gain.
REWARD_MIN_ACCURACY = 0.75
REWARD_MIN_MARGIN_GAIN = 4.0

MC = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=64)


def pair(prompt, chosen, rejected, **extra):
    ci, ri = torch.tensor(prompt + chosen), torch.tensor(prompt + rejected)
    cl, rl = ci.clone(), ri.clone()
    cl[:len(prompt)] = -100
    rl[:len(prompt)] = -100
    return {"chosen_input_ids": ci, "chosen_labels": cl, "rejected_input_ids": ri, "rejected_labels": rl, **extra}


def toy_pairs(n, seed):
    """Preference: responses made of 'good' tokens (20..27) beat responses of 'bad' tokens (30..37)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(3, 16, (2 + i % 3,), generator=g).tolist()
        k = 1 + i % 3
        good = torch.randint(20, 28, (k,), generator=g).tolist()
        bad = torch.randint(30, 38, (1 + (i + 1) % 3,), generator=g).tolist()
        out.append(pair(p, good, bad))
    return out


def make(tmp_path, data, name="rm", lr=1e-3, max_steps=2, n_epochs=1, batch_size=4, seed=42, **rc):
    cfg = TrainConfig(model_config=ModelConfig(**MC), file_dataset=data, batch_size=batch_size, n_epochs=n_epochs,
                      seed=seed,
                      output_dir=str(tmp_path / name), dtype="fp32", save_interval=None, eval_interval=None,
                      log_interval=1, max_steps=max_steps, ds_config=None, reward_config=RewardConfig(**rc),
                      optim_config=OptimConfig(initial_lr=lr, enable_lr_scheduler=False, weight_decay=0.0),
                      data_loader_config={"shuffle": False})
    return RewardTrainer(train_config=cfg)


def test_last_token_index_left_and_right_padding():
    m = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(m).tolist() == [2, 4, 4]


def test_bradley_terry_wiring_with_margin(tmp_path):
    data = toy_pairs(4, 0)
    for i, d in enumerate(data):
        d["margin"] = 0.5 * i                                          # per-pair margin from the data
    tr = make(tmp_path, data, margin=0.25)
    rm = tr.backend.unwrap(tr.model)
    assert isinstance(rm, RewardModel)
    batch = tr.collate([tr.train_dataset[i] for i in range(4)])
    out = tr.compute_loss(tr.model, batch)
    want, acc = 0.0, 0
    with torch.no_grad():
        for i, d in enumerate(data):                                  # unpadded, one sequence at a time
            h = rm.backbone(input_ids=d["chosen_input_ids"][None], return_hidden_states=True).hidden_states
            sc = float(rm.score_head(h[0, -1]))
            h = rm.backbone(input_ids=d["rejected_input_ids"][None], return_hidden_states=True).hidden_states
            sr = float(rm.score_head(h[0, -1]))
            z = sc - sr - (0.25 + 0.5 * i)
            want += math.log1p(math.exp(-z))
            acc += sc > sr
    assert float(out.loss) == pytest.approx(want, rel=1e-5)
    assert float(out.metrics["rewards/accuracy"]) == acc
    assert tr.count_units(batch) == 4


def train_toy_reward_model(tmp_path, seed: int = 42):
    """24 updates on the toy preference; returns the trainer, the held-out pairs and held-out metrics before/after."""
    train, held = toy_pairs(48, 1), toy_pairs(16, 2)
    tr = make(tmp_path, train, name=f"learn{seed}", lr=2e-3, max_steps=24, n_epochs=4, batch_size=8, seed=seed)
    before = tr.preference_accuracy(held)
    for w in tr.training_windows():
        tr.train_step(w)
    return tr, held, before, tr.preference_accuracy(held)


def measure_toy_preference(tmp_path, seed: int = 42) -> dict[str, float]:
    _, _, before, after = train_toy_reward_model(tmp_path, seed)
    return {"accuracy_before": before["rewards/accuracy"], "accuracy": after["rewards/accuracy"],
            "margin_gain": after["rewards/margin"] - before["rewards/margin"],
            "loss_drop": before["loss"] - after["loss"]}


def test_reward_trainer_learns_and_scores_round_trip(tmp_path):
    """Held-out accuracy and margin rise (floors from measurements over seeds, threads and CPU kernels:
    tests/learning_margins.py, docs/benchmarks.md), and the export scores like the trained model."""
    tr, held, before, after = train_toy_reward_model(tmp_path)
    print(f"\nreward model held-out accuracy {before['rewards/accuracy']:.2f} -> {after['rewards/accuracy']:.2f}, "
          f"margin {before['rewards/margin']:.3f} -> {after['rewards/margin']:.3f}, loss {before['loss']:.3f} -> "
          f"{after['loss']:.3f}")
    assert after["rewards/accuracy"] >= REWARD_MIN_ACCURACY and after["rewards/accuracy"] > before["rewards/accuracy"]
    assert after["rewards/margin"] > before["rewards/margin"] + REWARD_MIN_MARGIN_GAIN
    assert after["loss"] < before["loss"]
    # export -> from_pretrained: same scores
    path = tr.export()
    assert (path / "config.json").is_file() and (path / "reward_head.safetensors").is_file()
    loaded = RewardModel.from_pretrained(path)
    rm = tr.backend.unwrap(tr.model)
    prompts = [d["chosen_input_ids"][:2].tolist() for d in held]
    comps = [d["chosen_input_ids"][2:].tolist() for d in held]
    s1, s2 = rm.score(prompts, comps, batch_size=5), loaded.score(prompts, comps)
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)
    # batching/padding does not change a score; save_pretrained round trip too
    single = torch.cat([loaded.score([p], [c]) for p, c in zip(prompts, comps)])
    torch.testing.assert_close(single, s2, rtol=1e-5, atol=1e-5)
    loaded.save_pretrained(tmp_path / "again")
    torch.testing.assert_close(RewardModel.from_pretrained(tmp_path / "again").score(prompts, comps), s2)
    fn = loaded.reward_fn()
    assert fn(prompt_ids=prompts[:2], completion_ids=comps[:2]) == pytest.approx(s2[:2].tolist())


def test_reward_model_folder_checks(tmp_path):
    from llm_trainer.model import LlmModel
    LlmModel(ModelConfig(**MC)).save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match="not a reward model folder"):
        RewardModel.from_pretrained(tmp_path / "lm")
    rm = RewardModel.from_backbone(tmp_path / "lm")
    assert rm.score([[3, 4]], [[5]]).shape == (1,)
    with pytest.raises(ValueError, match="2 prompts but 1"):
        rm.score([[3], [4]], [[5]])


def test_reward_data_with_identical_pair_is_reported(tmp_path):
    data = toy_pairs(6, 3)
    data[2] = pair([3, 4], [20, 21], [20, 21])
    with pytest.raises(DataError, match="record 2.*identical"):
        make(tmp_path, data, name="bad")
