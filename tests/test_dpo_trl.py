"""Cross-check once against trl 1.16's DPOTrainer on a real (tiny) model.

A tiny ``Qwen2ForCausalLM`` (policy) and a second one with other weights (reference, so the loss is not the trivial
ln 2) are built with transformers. trl tokenises a 2-pair text dataset with a word-level tokenizer; its
``DPOTrainer.compute_loss`` must equal a hand-written sigmoid DPO loss from the HF models' logits, and OUR
DPOTrainer — loading the same folders via ``init_weights_path`` / ``ref_model_weights_path`` and fed trl's own token
ids — must give the same step-0 loss."""
import math

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

WORDS = [f"w{i}" for i in range(30)]
BETA = 0.1


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


def _qwen2(seed, vocab):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None,
                      attention_dropout=0.0)
    model = Qwen2ForCausalLM(cfg).float()
    with torch.no_grad():   # HF's init is tiny (std 0.02); spread the weights so log-probs differ visibly
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
    return model


def _hand_dpo(policy, ref, rows):
    """-mean log sigma(beta * ((pi_c - ref_c) - (pi_r - ref_r))) with sum-over-completion log-probs, one
    unpadded sequence at a time, from each HF model's logits."""
    def logp(model, prompt, completion):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        return sum(float(lp[len(prompt) + k - 1, t]) for k, t in enumerate(completion))
    total = 0.0
    for r in rows:
        h = (logp(policy, r["prompt_ids"], r["chosen_ids"]) - logp(ref, r["prompt_ids"], r["chosen_ids"])) - \
            (logp(policy, r["prompt_ids"], r["rejected_ids"]) - logp(ref, r["prompt_ids"], r["rejected_ids"]))
        total += math.log1p(math.exp(-BETA * h))
    return total / len(rows)


def test_our_step0_dpo_loss_equals_trl(tmp_path):
    from datasets import Dataset
    from trl import DPOConfig as TrlDPOConfig
    from trl import DPOTrainer as TrlDPOTrainer

    from llm_trainer import DPOConfig, OptimConfig, TrainConfig
    from llm_trainer.trainers.dpo import DPOTrainer

    tok = _tokenizer()
    vocab = len(WORDS) + 2
    policy, ref = _qwen2(0, vocab), _qwen2(1, vocab)
    policy.save_pretrained(tmp_path / "policy")
    ref.save_pretrained(tmp_path / "ref")
    data = Dataset.from_dict({
        "prompt": ["w1 w2 w3", "w4 w5"],
        "chosen": [" w6 w7", " w8 w9 w10 w11"],
        "rejected": [" w12", " w13 w14"],
    })
    args = TrlDPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, beta=BETA,
                        loss_type=["sigmoid"], report_to="none", use_cpu=True, bf16=False, fp16=False,
                        max_length=None, precompute_ref_log_probs=False, dataset_num_proc=None, logging_steps=1)
    trainer = TrlDPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=tok)
    rows = [trainer.train_dataset[i] for i in range(2)]
    assert rows[0]["chosen_ids"][-1] == tok.eos_token_id                # trl appended EOS to the responses
    batch = trainer.data_collator([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows])
    trainer.model.train()
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, batch))
    hand = _hand_dpo(policy, ref, rows)
    assert trl_loss == pytest.approx(hand, rel=1e-4)                   # trl reproduces the hand-written loss
    assert abs(trl_loss - math.log(2)) > 1e-2                           # and the reference matters

    def item(r):
        p, c, j = r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]
        ci, ri = torch.tensor(p + c), torch.tensor(p + j)
        cl, rl = ci.clone(), ri.clone()
        cl[:len(p)] = -100
        rl[:len(p)] = -100
        return {"chosen_input_ids": ci, "chosen_labels": cl, "rejected_input_ids": ri, "rejected_labels": rl}

    cfg = TrainConfig(init_weights_path=str(tmp_path / "policy"), file_dataset=[item(r) for r in rows],
                      batch_size=2, output_dir=str(tmp_path / "ours"), dtype="fp32", save_interval=None,
                      eval_interval=None, max_steps=1, ds_config=None, data_loader_config={"shuffle": False},
                      optim_config=OptimConfig(initial_lr=1e-4),
                      dpo_config=DPOConfig(loss_type="dpo", loss_beta=BETA,
                                           ref_model_weights_path=str(tmp_path / "ref")))
    ours = DPOTrainer(train_config=cfg)
    stats = ours.train_step(next(iter(ours.training_windows())))
    print(f"\nstep-0 DPO loss: ours {stats['loss']:.6f}  trl {trl_loss:.6f}  hand {hand:.6f}")
    assert stats["loss"] == pytest.approx(trl_loss, rel=1e-4)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    for ours_key, trl_key in (("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                              ("rewards/margin", "rewards/margins"), ("rewards/accuracy", "rewards/accuracies"),
                              ("logps/chosen", "logps/chosen"), ("logps/rejected", "logps/rejected")):
        assert stats[ours_key] == pytest.approx(trl_metrics[trl_key], rel=1e-3, abs=1e-5), ours_key
