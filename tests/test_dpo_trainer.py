"""DPOTrainer wiring on a tiny LlmModel (CPU, fp32): every loss type equals an independent computation from the
model's logits (one unpadded sequence at a time, plain log_softmax, the paper formulas written out here), ln 2 at
step 0, precomputed reference log-probs, LoRA reference without a second copy, bad pairs, and learning."""
import math

import pytest
import torch

from llm_trainer import DPOConfig, LoRAConfig, ModelConfig, OptimConfig, TrainConfig
from llm_trainer.data.formats import DataError
from llm_trainer.model import LlmModel
from llm_trainer.trainers.dpo import DPOTrainer

# Floors from tests/learning_margins.py (2026-11-28: seeds 42, 0-3, the same on every kernel set and thread count
# measured; docs/benchmarks.md "Learning tests' margins"): margins and the loss drop at about half their worst
# measured value, accuracies half-way between a coin flip (0.5) and their worst measured value.
DPO_FLOORS = {
    "last5_accuracy": 0.65,     # worst measured 0.825
    "last5_margin": 0.25,       # worst measured 0.526
    "loss_drop": 0.08,          # worst measured 0.178
    "train_accuracy": 0.65,     # worst measured 0.838
    "train_margin": 0.3,        # worst measured 0.622
    "held_accuracy": 0.6,       # worst measured 0.750
    "held_margin": 0.2,         # worst measured 0.471
}

MC = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=64)


def pair(prompt, chosen, rejected):
    ci, ri = torch.tensor(prompt + chosen), torch.tensor(prompt + rejected)
    cl, rl = ci.clone(), ri.clone()
    cl[:len(prompt)] = -100
    rl[:len(prompt)] = -100
    return {"chosen_input_ids": ci, "chosen_labels": cl, "rejected_input_ids": ri, "rejected_labels": rl}


def random_pairs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(3, 48, (2 + i % 3,), generator=g).tolist()      # prompts of 2..4 tokens
        c = torch.randint(3, 48, (1 + i % 4,), generator=g).tolist()      # responses of different lengths
        r = torch.randint(3, 48, (1 + (i + 2) % 3,), generator=g).tolist()
        out.append(pair(p, c, r))
    return out


def make_trainer(tmp_path, data, name="run", batch_size=4, lora=None, lr=1e-3, max_steps=2, n_epochs=1, seed=42,
                 **dpo):
    cfg = TrainConfig(model_config=ModelConfig(**MC), file_dataset=data, batch_size=batch_size, n_epochs=n_epochs,
                      seed=seed,
                      output_dir=str(tmp_path / name), dtype="fp32", save_interval=None, eval_interval=None,
                      log_interval=1, max_steps=max_steps, ds_config=None, lora=lora,
                      optim_config=OptimConfig(initial_lr=lr, enable_lr_scheduler=False, weight_decay=0.0),
                      dpo_config=DPOConfig(**dpo), data_loader_config={"shuffle": False})
    return DPOTrainer(train_config=cfg)


def first_batch(tr, n=None):
    n = n or tr.config.batch_size
    return tr.collate([tr.train_dataset[i] for i in range(n)])


def perturb(module, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------- independent computation
def seq_logp(model, ids, labels):
    """sum_t log p(y_t | y_<t) over trained tokens of ONE unpadded sequence, from the full logits, in float64."""
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    total, n = 0.0, 0
    for t in range(1, len(ids)):
        if int(labels[t]) != -100:
            total += float(lp[t - 1, int(labels[t])])
            n += 1
    return total, n


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def expected_pair(loss_type, pc, pr, rc, rr, nc, nr, beta, eps, gamma):
    """Loss of one pair from the papers' equations, and the (chosen, rejected) rewards."""
    h = (pc - rc) - (pr - rr)
    if loss_type == "dpo":                      # Rafailov et al. eq. 7; cDPO with eps
        loss = -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h)
    elif loss_type == "robust":                 # Chowdhury et al. 2024
        loss = ((1 - eps) * -logsig(beta * h) - eps * -logsig(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":                  # SLiC
        loss = max(0.0, 1 - beta * h)
    elif loss_type == "ipo":                    # Azar et al. eq. 17, length-averaged log-ratios
        loss = ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
    elif loss_type == "orpo":                   # Hong et al. eq. 6-7: NLL + lambda * odds-ratio term
        mc, mr = pc / nc, pr / nr
        lo = (mc - math.log(1 - math.exp(mc))) - (mr - math.log(1 - math.exp(mr)))
        return -beta * logsig(lo) - mc, beta * mc, beta * mr
    elif loss_type == "simpo":                  # Meng et al. eq. 6
        mc, mr = pc / nc, pr / nr
        return -logsig(beta * (mc - mr) - gamma), beta * mc, beta * mr
    return loss, beta * (pc - rc), beta * (pr - rr)


CASES = [("dpo", 0.1, 0.0), ("dpo", 0.5, 0.2), ("robust", 0.3, 0.2), ("hinge", 0.5, 0.0), ("ipo", 0.4, 0.0),
         ("orpo", 0.25, 0.0), ("simpo", 2.0, 0.0)]


@pytest.mark.parametrize("loss_type,beta,eps", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_trainer_loss_equals_independent_computation(tmp_path, loss_type, beta, eps):
    data = random_pairs(4)
    tr = make_trainer(tmp_path, data, loss_type=loss_type, loss_beta=beta, loss_label_smoothing=eps,
                      simpo_gamma=0.3)
    policy = tr.backend.unwrap(tr.model)
    if loss_type in ("orpo", "simpo"):
        assert tr.reference is None                                    # no reference loaded at all
        ref = None
    else:
        ref = tr.reference.frozen
        assert ref is not None and ref is not policy
    perturb(policy)                                                     # policy != reference
    batch = first_batch(tr)
    out = tr.compute_loss(tr.model, batch)
    want, ch, rj, acc, nll = 0.0, 0.0, 0.0, 0.0, 0.0
    for item in data:
        pc, nc = seq_logp(policy, item["chosen_input_ids"], item["chosen_labels"])
        pr, nr = seq_logp(policy, item["rejected_input_ids"], item["rejected_labels"])
        rc = seq_logp(ref, item["chosen_input_ids"], item["chosen_labels"])[0] if ref else 0.0
        rr = seq_logp(ref, item["rejected_input_ids"], item["rejected_labels"])[0] if ref else 0.0
        loss, c, r = expected_pair(loss_type, pc, pr, rc, rr, nc, nr, beta, eps, 0.3)
        want += loss
        ch, rj, acc, nll = ch + c, rj + r, acc + (c > r), nll - pc / nc
    assert float(out.loss) == pytest.approx(want, rel=1e-5, abs=1e-6)
    m = {k: float(v) for k, v in out.metrics.items()}
    assert m["rewards/chosen"] == pytest.approx(ch, rel=1e-5, abs=1e-6)
    assert m["rewards/rejected"] == pytest.approx(rj, rel=1e-5, abs=1e-6)
    assert m["rewards/margin"] == pytest.approx(ch - rj, rel=1e-5, abs=1e-6)
    assert m["rewards/accuracy"] == acc
    assert m["nll"] == pytest.approx(nll, rel=1e-5)
    assert tr.count_units(batch) == 4


def test_nll_term_and_full_logits_path_agree(tmp_path):
    """nll_loss_coef adds coef * mean-token NLL of each chosen response; the chunked log-prob path (hidden states,
    response tokens only) equals the full-logits path."""
    data = random_pairs(4, seed=3)
    tr = make_trainer(tmp_path, data, loss_beta=0.2, nll_loss_coef=0.7)
    perturb(tr.backend.unwrap(tr.model))
    batch = first_batch(tr)
    out = tr.compute_loss(tr.model, batch)
    base = float(out.metrics["loss/dpo"])
    assert float(out.loss) == pytest.approx(base + 0.7 * float(out.metrics["nll"]), rel=1e-6)
    chunked = tr.sequence_logps(tr.model, batch)[0]
    tr.logps_chunk_size = 3
    small_chunks = tr.sequence_logps(tr.model, batch)[0]
    tr._use_chunks = lambda module: False
    full = tr.sequence_logps(tr.model, batch)[0]
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(small_chunks, full, rtol=1e-5, atol=1e-5)


def test_step0_loss_is_ln2_through_the_loop(tmp_path):
    tr = make_trainer(tmp_path, random_pairs(8), loss_beta=0.1)
    ref, policy = tr.reference.frozen, tr.backend.unwrap(tr.model)
    for (n, p), (_, q) in zip(policy.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n                                    # reference = initial policy, not random
    assert not any(q.requires_grad for q in ref.parameters())
    window = next(iter(tr.training_windows()))
    stats = tr.train_step(window)
    assert stats["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert stats["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert stats["rewards/accuracy"] == 0.0                            # ties are not counted as correct
    assert stats["pairs_per_step"] == 4
    # the policy moved, the reference did not
    assert any(not torch.equal(p, q) for p, q in zip(policy.parameters(), ref.parameters()))


def test_mask_prompt_false_counts_prompt_tokens(tmp_path):
    data = random_pairs(4)
    tr = make_trainer(tmp_path, data, loss_type="simpo", mask_prompt=False)
    batch = first_batch(tr)
    lengths = tr.sequence_logps(tr.model, batch)[1]
    want = [len(d["chosen_input_ids"]) - 1 for d in data] + [len(d["rejected_input_ids"]) - 1 for d in data]
    assert lengths.tolist() == want


def test_ref_model_weights_path_and_precomputed_reference(tmp_path):
    torch.manual_seed(5)
    other = LlmModel(ModelConfig(**MC))
    other.save_pretrained(tmp_path / "ref")
    data = random_pairs(10, seed=7)
    online = make_trainer(tmp_path, data, name="online", ref_model_weights_path=str(tmp_path / "ref"))
    for (n, p), q in zip(other.named_parameters(), online.reference.frozen.parameters()):
        assert torch.equal(p, q), n
    pre = make_trainer(tmp_path, data, name="pre", ref_model_weights_path=str(tmp_path / "ref"),
                       precompute_ref_log_probs=True)
    assert pre.reference.frozen is None                                # freed after the reference pass
    table = pre.train_dataset.ref_logps
    assert table.shape == (10, 2) and torch.isfinite(table).all()
    full = online.collate([online.train_dataset[i] for i in range(10)])
    rc, rr = online.reference_logps(full)
    torch.testing.assert_close(table[:, 0], rc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(table[:, 1], rr, rtol=1e-5, atol=1e-5)
    b_on, b_pre = first_batch(online), first_batch(pre)
    assert "ref_logps" in b_pre and "ref_logps" not in b_on
    l_on, l_pre = online.compute_loss(online.model, b_on), pre.compute_loss(pre.model, b_pre)
    assert float(l_pre.loss) == pytest.approx(float(l_on.loss), rel=1e-5)
    assert abs(float(l_on.loss) / 4 - math.log(2)) > 1e-3             # a real (non-trivial) reference
    s_on = [online.train_step(w)["loss"] for w in online.training_windows()]
    s_pre = [pre.train_step(w)["loss"] for w in pre.training_windows()]
    assert s_on == pytest.approx(s_pre, rel=1e-5)


def _held_bytes(trainer):
    """Bytes of every distinct parameter/buffer storage of every module the trainer holds."""
    seen, total = set(), 0
    for value in vars(trainer).values():
        value = getattr(value, "frozen", value)                        # a Reference holds its frozen replica
        if isinstance(value, torch.nn.Module):
            for t in list(value.parameters()) + list(value.buffers()):
                key = t.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += t.untyped_storage().nbytes()
    return total


def test_lora_dpo_has_no_second_copy_and_matches_full_dpo(tmp_path):
    from llm_trainer.model.lora import LoRALinear
    from llm_trainer.safetensors_writer import materialize
    from llm_trainer.trainers.setup import merge_lora_state
    data = random_pairs(4, seed=11)
    lo = make_trainer(tmp_path, data, name="lora", lora=LoRAConfig(r=4, alpha=8.0), loss_beta=0.3)
    full = make_trainer(tmp_path, data, name="full", loss_beta=0.3)
    assert lo.reference.frozen is None and lo.reference.policy is lo.backend.unwrap(lo.model)
    lora_policy, full_policy = lo.backend.unwrap(lo.model), full.backend.unwrap(full.model)
    policy_bytes = sum(p.numel() * p.element_size() for p in full_policy.parameters())
    lora_bytes = sum(m.lora_A.weight.numel() * 4 + m.lora_B.weight.numel() * 4
                     for m in lora_policy.modules() if isinstance(m, LoRALinear))
    assert _held_bytes(lo) <= policy_bytes + lora_bytes + 4096         # one copy of the weights (+ adapters)
    assert _held_bytes(full) >= 2 * policy_bytes                       # full DPO: policy + frozen copy
    # Same base weights (same seed); give the adapters non-zero B so that policy != reference.
    base = {k: v for k, v in lora_policy.state_dict().items() if "lora_" not in k}
    for k, v in full.reference.frozen.state_dict().items():
        assert torch.equal(v, base[k]), k
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora_policy.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(0.05 * torch.randn(m.lora_B.weight.shape, generator=g))
    merged = materialize(merge_lora_state(lora_policy.state_dict(), lora_policy))
    full_policy.load_state_dict(merged)
    out_lo = lo.compute_loss(lo.model, first_batch(lo))
    out_full = full.compute_loss(full.model, first_batch(full))
    assert float(out_lo.loss) == pytest.approx(float(out_full.loss), rel=1e-5)
    assert abs(float(out_lo.loss) / 4 - math.log(2)) > 1e-4
    for k in ("rewards/chosen", "rewards/rejected"):
        assert float(out_lo.metrics[k]) == pytest.approx(float(out_full.metrics[k]), rel=1e-4, abs=1e-6)
    # step 0 with untouched adapters: ln 2 through the loop
    lo2 = make_trainer(tmp_path, data, name="lora2", lora=LoRAConfig(r=4, alpha=8.0))
    assert lo2.train_step(next(iter(lo2.training_windows())))["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_bad_pairs_reported_with_record_numbers(tmp_path):
    data = random_pairs(8)
    data[3] = pair([5, 6, 7], [], [9, 10])                              # empty chosen response
    data[5] = pair([5, 6], [11, 12], [11, 12])                          # identical chosen / rejected
    with pytest.raises(DataError) as e:
        make_trainer(tmp_path, data, name="bad")
    msg = str(e.value)
    assert "record 3" in msg and "empty response" in msg and "2 bad pairs" in msg and "3, 5" in msg
    assert "skip_bad_pairs" in msg
    with pytest.warns(UserWarning, match="skipped 2 bad pair"):
        tr = make_trainer(tmp_path, data, name="skip", skip_bad_pairs=True)
    assert len(tr.train_dataset) == 6
    assert [b[1] for b in tr.skipped_pairs["train"]] == [3, 5]
    assert "identical" in tr.skipped_pairs["train"][1][2]
    assert 3 not in tr.train_dataset.keep and 5 not in tr.train_dataset.keep


def test_bad_pair_in_a_data_file_names_file_and_record(tmp_path):
    from llm_trainer.data.formats import IndexedWriter
    path = tmp_path / "pairs"
    with IndexedWriter(path, stage="dpo", vocab_size=48) as w:
        for i in range(6):
            c, r = [3, 4, 5 + i, 6], [3, 4, 20 + i]
            if i == 4:
                r = list(c)
            w.add_pair(c, [0, 0, 1, 1], r, [0, 0] + [1] * (len(r) - 2), prompt_length=2)
    with pytest.raises(DataError) as e:
        make_trainer(tmp_path, str(path), name="file")
    assert str(path) in str(e.value) and "record 4" in str(e.value) and "identical" in str(e.value)
    assert e.value.record == 4


def _arith_pairs(pairs_ab, seed):
    """prompt 'a + b =' (digit tokens 3..12, '+' 13, '=' 14), chosen: the right sum's digits + eos (2),
    rejected: a wrong sum."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for a, b in pairs_ab:
        wrong = (a + b + int(torch.randint(1, 9, (1,), generator=g))) % 19
        digits = lambda n: [3 + int(d) for d in str(n)]  # noqa: E731
        out.append(pair([3 + a, 13, 3 + b, 14], digits(a + b) + [2], digits(wrong) + [2]))
    return out


def measure_synthetic_preferences(tmp_path, seed: int = 42) -> dict[str, float]:
    """40 DPO steps on correct vs wrong sums: the first step's and the last five steps' training metrics, and
    reward accuracy / margin on held-out and training pairs before and after."""
    all_ab = [(a, b) for a in range(10) for b in range(10)]
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(100, generator=g).tolist()
    train = _arith_pairs([all_ab[i] for i in perm[:80]], 1)
    held = _arith_pairs([all_ab[i] for i in perm[80:]], 2)
    tr = make_trainer(tmp_path, train, name=f"learn{seed}", batch_size=8, lr=3e-3, max_steps=40, n_epochs=4,
                      loss_beta=0.3, seed=seed)
    before, before_train = tr.preference_accuracy(held), tr.preference_accuracy(tr.train_dataset)
    stats = [tr.train_step(w) for w in tr.training_windows()]
    after, after_train = tr.preference_accuracy(held), tr.preference_accuracy(tr.train_dataset)
    return {"first_accuracy": stats[0]["rewards/accuracy"], "first_margin": stats[0]["rewards/margin"],
            "last5_accuracy": sum(s["rewards/accuracy"] for s in stats[-5:]) / 5,
            "last5_margin": sum(s["rewards/margin"] for s in stats[-5:]) / 5,
            "loss_drop": stats[0]["loss"] - stats[-1]["loss"],
            "held_accuracy_before": before["rewards/accuracy"], "held_accuracy": after["rewards/accuracy"],
            "held_margin_before": before["rewards/margin"], "held_margin": after["rewards/margin"],
            "train_accuracy_before": before_train["rewards/accuracy"], "train_accuracy": after_train["rewards/accuracy"],
            "train_margin_before": before_train["rewards/margin"], "train_margin": after_train["rewards/margin"]}


def test_dpo_learns_synthetic_preferences(tmp_path):
    """Correct vs wrong sums: training reward accuracy and margin rise, and so does held-out accuracy (the margins'
    measurements over seeds, threads and CPU kernels: tests/learning_margins.py, docs/benchmarks.md)."""
    m = measure_synthetic_preferences(tmp_path)
    print("\n" + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))
    assert m["first_accuracy"] == 0.0 and m["first_margin"] == pytest.approx(0.0, abs=1e-6)
    for key, floor in DPO_FLOORS.items():
        assert m[key] >= floor, (key, m)


def test_lora_precompute_and_eval_data(tmp_path):
    """LoRA + precompute: the reference pass uses the base model (adapters off) and frees nothing extra; the eval
    data gets its own reference log-probs and eval_loss runs."""
    from llm_trainer.model.lora import LoRALinear
    data, held = random_pairs(8, seed=2), random_pairs(4, seed=9)
    cfg_kw = dict(lora=LoRAConfig(r=4, alpha=8.0), loss_beta=0.2)
    tr = make_trainer(tmp_path, data, name="lp", precompute_ref_log_probs=True, **cfg_kw)
    tr.eval_dataset = tr.build_dataset(held, "eval")
    tr.precompute_reference(tr.eval_dataset)
    assert tr.train_dataset.ref_logps.shape == (8, 2) and tr.eval_dataset.ref_logps.shape == (4, 2)
    policy = tr.backend.unwrap(tr.model)
    with torch.no_grad():
        for m in policy.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.05)                        # policy != base from here on
    batch = first_batch(tr)
    rc, rr = tr.reference_logps(batch)                                 # online: base model via lora_disabled
    torch.testing.assert_close(batch["ref_logps"][:, 0], rc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch["ref_logps"][:, 1], rr, rtol=1e-5, atol=1e-5)
    ev = tr.eval_dataset_metrics()
    assert math.isfinite(ev["eval_loss"]) and abs(ev["eval_loss"] - math.log(2)) > 1e-4
