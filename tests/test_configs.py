import dataclasses
import json

import pytest

from llm_trainer import configs as C
from llm_trainer.configs import (DPOConfig, DataLoaderConfig, GRPOConfig, KDConfig, LoRAConfig, LossConfig,
                                 OptimConfig, PPOConfig, PretrainConfig, RewardConfig, SFTConfig, TrainConfig)

ALL = [TrainConfig, OptimConfig, PretrainConfig, SFTConfig, KDConfig, DPOConfig, RewardConfig, GRPOConfig,
       PPOConfig, DataLoaderConfig, LoRAConfig, LossConfig, C.AdaptiveKLConfig]


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_every_default_constructs_and_round_trips(cls, tmp_path):
    cfg = cls()
    assert cls.from_dict(cfg.to_dict()) == cfg
    assert cls.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    cfg.save(tmp_path / "c.toml")
    assert cls.load(tmp_path / "c.toml") == cfg


def test_all_kw_only():
    for cls in ALL:
        with pytest.raises(TypeError):
            cls(1)


def test_train_config_defaults():
    c = TrainConfig()
    assert c.optim_config == OptimConfig()  # the original raised here (initial_lr required)
    assert c.data_loader_config.shuffle is True
    assert c.block_size == c.model_config.max_position_embeddings
    assert c.report_to == [] and c.nan_policy == "stop" and c.resume_from is None


def test_nested_round_trip_full(tmp_path):
    c = TrainConfig(
        n_epochs=2, batch_size=3, dataset_block_size=64, file_dataset=["a.npy", "b.npy"],
        optim_config=OptimConfig(optim_type="lion", initial_lr=1e-5, max_lr=1e-4, min_lr=1e-6, warmup_iters=10,
                                 betas=(0.9, 0.98), enable_lr_scheduler=True, cosine_annealing_period=100,
                                 cosine_annealing_period_mul=2),
        sft_config=SFTConfig(packing=True, kd_config=KDConfig(teacher_model_path="t", kind="jsd", jsd_beta=0.3)),
        dpo_config=DPOConfig(loss_type="simpo", loss_beta=2.0),
        grpo_config=GRPOConfig(group_size=4, loss_type="dapo", loss_clip_eps_high=0.28, reward_weights=[1, 0.5]),
        ppo_config=PPOConfig(value_optim_config=OptimConfig(initial_lr=5e-6), adaptive_kl=C.AdaptiveKLConfig()),
        loss_config=LossConfig(critical_tokens=[3, 5], critical_token_weight=2.0),
        lora=LoRAConfig(r=4, target_modules=["q_proj"]), report_to="tensorboard", resume_from="auto",
    )
    assert c.report_to == ["tensorboard"]
    for name in ("c.toml", "c.json"):
        c.save(tmp_path / name)
        back = TrainConfig.load(tmp_path / name)
        assert back == c, name
    assert isinstance(back.optim_config.betas, tuple)
    assert isinstance(back.ppo_config.value_optim_config, OptimConfig)
    assert isinstance(back.sft_config.kd_config, KDConfig)


def test_dicts_accepted_for_nested_fields():
    c = TrainConfig(optim_config={"initial_lr": 3e-4}, sft_config={"kd_config": {"teacher_model_path": "x"}})
    assert isinstance(c.optim_config, OptimConfig) and c.optim_config.initial_lr == 3e-4
    assert isinstance(c.sft_config.kd_config, KDConfig)
    mc = TrainConfig.from_dict({"model_config": {"hidden_size": 64, "num_attention_heads": 4}}).model_config
    assert type(mc).__name__ == "ModelConfig" and mc.hidden_size == 64


def test_callables_skipped_with_note_or_strict_error():
    kd = KDConfig(teacher_logits_provider=lambda ids, mask: None)
    c = TrainConfig(pretrain_config=PretrainConfig(kd_config=kd), file_dataset=object())
    d = c.to_dict()
    assert "teacher_logits_provider" not in d["pretrain_config"]["kd_config"]
    assert "file_dataset" not in d
    with pytest.raises(TypeError, match="TrainConfig.file_dataset"):
        c.to_dict(strict=True)
    with pytest.raises(TypeError, match="kd_config.teacher_logits_provider"):
        PretrainConfig(kd_config=kd).to_dict(strict=True)


def test_unknown_key_names_the_key_and_suggests():
    with pytest.raises(ValueError, match=r"OptimConfig.*'inital_lr'.*initial_lr"):
        TrainConfig.from_dict({"optim_config": {"inital_lr": 1e-3}})
    with pytest.raises(ValueError, match="unknown field 'gradient_accumulation'.*gradient_accumulation_steps"):
        TrainConfig.from_dict({"gradient_accumulation": 2})


def test_aliases_of_old_names():
    assert DataLoaderConfig.from_dict({"data_loader_shuffle": False}).shuffle is False
    assert GRPOConfig.from_dict({"importance_sampling_level": "sequence"}).importance_sampling_level == "sequence"
    assert DPOConfig(loss_ipo=True).loss_type == "ipo"


@pytest.mark.parametrize("cls,kwargs,needle", [
    (OptimConfig, dict(optim_type="sgd"), "OptimConfig.optim_type"),
    (OptimConfig, dict(initial_lr=1e-3, max_lr=1e-4), "OptimConfig.max_lr"),
    (OptimConfig, dict(max_lr=1e-3, min_lr=1e-2), "OptimConfig.min_lr"),
    (OptimConfig, dict(cosine_annealing_period_mul=0.5), "OptimConfig.cosine_annealing_period_mul"),
    (OptimConfig, dict(betas=(0.9, 1.5)), "OptimConfig.betas"),
    (OptimConfig, dict(initial_lr=0.0), "OptimConfig.initial_lr"),
    (OptimConfig, dict(warmup_iters=5, warmup_ratio=0.1), "OptimConfig.warmup_ratio"),
    (OptimConfig, dict(warmup_iters=-1), "OptimConfig.warmup_iters"),
    (TrainConfig, dict(batch_size=0), "TrainConfig.batch_size"),
    (TrainConfig, dict(dtype="float16"), "TrainConfig.dtype"),
    (TrainConfig, dict(nan_policy="ignore"), "TrainConfig.nan_policy"),
    (TrainConfig, dict(report_to=["mlflow"]), "TrainConfig.report_to"),
    (TrainConfig, dict(dataset_block_size=10**6), "TrainConfig.dataset_block_size"),
    (TrainConfig, dict(max_grad_norm=0.0), "TrainConfig.max_grad_norm"),
    (TrainConfig, dict(keep_last_checkpoints=0), "TrainConfig.keep_last_checkpoints"),
    (TrainConfig, dict(n_epochs=True), "TrainConfig.n_epochs"),
    (KDConfig, dict(kind="kl"), "KDConfig.kind"),
    (KDConfig, dict(kd_coef=1.5), "KDConfig.kd_coef"),
    (KDConfig, dict(teacher_model_path="a", teacher_logits_provider=print), "KDConfig.teacher_model_path"),
    (DPOConfig, dict(loss_type="kto"), "DPOConfig.loss_type"),
    (DPOConfig, dict(loss_beta=0), "DPOConfig.loss_beta"),
    (DPOConfig, dict(loss_type="ipo", loss_label_smoothing=0.1), "DPOConfig.loss_label_smoothing"),
    (GRPOConfig, dict(loss_type="ppo"), "GRPOConfig.loss_type"),
    (GRPOConfig, dict(loss_delta=0.5), "GRPOConfig.loss_delta"),
    (GRPOConfig, dict(kl_estimator="k4"), "GRPOConfig.kl_estimator"),
    (GRPOConfig, dict(group_size=0), "GRPOConfig.group_size"),
    (GRPOConfig, dict(dynamic_sampling=True, filter_zero_variance_groups=True), "GRPOConfig.dynamic_sampling"),
    (PPOConfig, dict(lam=1.5), "PPOConfig.lam"),
    (PPOConfig, dict(normalize_method="RunningMeanStd"), "PPOConfig.normalize_method"),
    (LoRAConfig, dict(r=0), "LoRAConfig.r"),
    (LoRAConfig, dict(target_modules=[]), "LoRAConfig.target_modules"),
    (LossConfig, dict(critical_tokens=[-1]), "LossConfig.critical_tokens"),
    (DataLoaderConfig, dict(num_workers=-1), "DataLoaderConfig.num_workers"),
    (PretrainConfig, dict(gradient_accumulation_steps=0), "PretrainConfig.gradient_accumulation_steps"),
    (SFTConfig, dict(chunked_cross_entropy_size=0), "SFTConfig.chunked_cross_entropy_size"),
    (RewardConfig, dict(margin=float("nan")), "RewardConfig.margin"),
])
def test_validation_names_field_and_value(cls, kwargs, needle):
    with pytest.raises(ValueError) as e:
        cls(**kwargs)
    msg = str(e.value)
    assert needle in msg
    assert "got" in msg


def test_optim_resolved_values():
    a = OptimConfig()
    assert a.peak_lr == a.initial_lr and a.final_lr == pytest.approx(0.1 * a.initial_lr)
    assert a.resolved_betas() == (0.9, 0.95) and a.resolved_weight_decay() == 0.01
    lion = OptimConfig(optim_type="lion")
    assert lion.resolved_betas() == (0.9, 0.99) and lion.resolved_weight_decay() == 0.0
    r = OptimConfig(warmup_ratio=0.1)
    assert r.resolved_warmup_iters(1000) == 100 and r.resolved_warmup_iters(None) == 0


def test_kd_check_teacher():
    with pytest.raises(ValueError, match="exactly one"):
        KDConfig().check_teacher()
    KDConfig(teacher_model_path="x").check_teacher()


def test_stage_properties():
    assert not DPOConfig(loss_type="orpo").needs_reference and DPOConfig().needs_reference
    assert not GRPOConfig(loss_beta=0).needs_reference
    assert GRPOConfig(loss_clip_eps=0.2).clip_eps_high == 0.2


def test_reexports():
    assert C.ModelConfig.__name__ == "ModelConfig"
    with pytest.raises(AttributeError):
        C.NoSuchConfig  # noqa: B018


def test_toml_writer_handles_special_values(tmp_path):
    text = C.dict_to_toml({"a": 1, "b": None, "s": 'x"y\\z', "f": float("inf"), "l": [1, 2], "t": {"u": True}})
    import tomllib

    d = tomllib.loads(text)
    assert d == {"a": 1, "s": 'x"y\\z', "f": float("inf"), "l": [1, 2], "t": {"u": True}}


def test_fields_have_no_required_args():
    for cls in ALL:
        for f in dataclasses.fields(cls):
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, \
                f"{cls.__name__}.{f.name}"


def test_ds_config_subclass_round_trip(tmp_path):
    ds = pytest.importorskip("llm_trainer.parallel.ds_config")
    for zero in (ds.DsZero0Config(), ds.DsZero1Config(), ds.DsZero2Config(), ds.DsZero3Config()):
        c = TrainConfig(ds_config=ds.DsConfig(zero_config=zero))
        c.save(tmp_path / "c.toml")
        back = TrainConfig.load(tmp_path / "c.toml")
        assert type(back.ds_config.zero_config) is type(zero)
        assert back == c


def test_vlm_model_config_round_trip(tmp_path):
    vlm = pytest.importorskip("llm_trainer.model.vlm")
    c = TrainConfig(model_config=vlm.VLMConfig(image_token_id=5, vocab_size=64, hidden_size=32,
                                               num_attention_heads=2, num_hidden_layers=1))
    c.save(tmp_path / "v.toml")
    back = TrainConfig.load(tmp_path / "v.toml")
    assert type(back.model_config) is vlm.VLMConfig and back == c


# ----------------------------------------------------------------------------------- one home per setting
def test_accumulation_has_one_home_and_the_stage_alias_raises_on_conflict():
    from llm_trainer.configs import SFTConfig
    assert TrainConfig(gradient_accumulation_steps=4).accumulation_steps() == 4
    old = TrainConfig(sft_config=SFTConfig(gradient_accumulation_steps=3))        # the seed's spelling still works
    assert old.accumulation_steps(old.sft_config) == 3
    both = TrainConfig(gradient_accumulation_steps=3, sft_config=SFTConfig(gradient_accumulation_steps=3))
    assert both.accumulation_steps(both.sft_config) == 3
    with pytest.raises(ValueError, match="sft_config.gradient_accumulation_steps.*conflicts"):
        TrainConfig(gradient_accumulation_steps=2, sft_config=SFTConfig(gradient_accumulation_steps=8))
    assert TrainConfig().accumulation_steps(SFTConfig()) == 1


def test_a_stage_config_in_another_trainers_slot_raises():
    from llm_trainer.configs import SFTConfig
    cfg = TrainConfig(sft_config=SFTConfig(mask_prompt=False))
    with pytest.raises(ValueError, match="TrainConfig.sft_config.*DPOTrainer reads only TrainConfig.dpo_config"):
        cfg.stage_config("dpo_config", "DPOTrainer")
    assert cfg.stage_config("sft_config", "SFTTrainer").mask_prompt is False
    assert isinstance(TrainConfig().stage_config("dpo_config", "DPOTrainer"), DPOConfig)


def test_every_config_field_has_a_docstring():
    """A string literal right under every dataclass field of the config modules (torchtitan style)."""
    import ast
    import dataclasses
    import importlib
    from pathlib import Path

    import llm_trainer.configs as pkg
    missing = []
    for path in sorted(Path(pkg.__file__).parent.glob("*.py")):
        module = importlib.import_module(f"llm_trainer.configs.{path.stem}" if path.stem != "__init__"
                                         else "llm_trainer.configs")
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.ClassDef) or not dataclasses.is_dataclass(getattr(module, node.name, None)):
                continue
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    if not (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                            and isinstance(nxt.value.value, str) and nxt.value.value.strip()):
                        missing.append(f"{node.name}.{stmt.target.id}")
    assert not missing, f"config fields without a docstring: {missing}"


def test_schedule_fields_turn_the_schedule_on_and_an_explicit_off_raises():
    assert OptimConfig(initial_lr=1e-4).enable_lr_scheduler is False
    assert OptimConfig(initial_lr=1e-5, max_lr=1e-3, warmup_iters=5).enable_lr_scheduler is True
    with pytest.raises(ValueError, match="enable_lr_scheduler.*max_lr, warmup_iters are set and would be ignored"):
        OptimConfig(initial_lr=1e-5, max_lr=1e-3, warmup_iters=5, enable_lr_scheduler=False)
