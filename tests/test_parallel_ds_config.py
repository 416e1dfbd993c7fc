"""DsConfig & friends: defaults construct, validation, and the emitted DeepSpeed JSON (checked key by key and
by DeepSpeed's own config parser, whose ZeRO section forbids unknown keys)."""
from __future__ import annotations

import json

import pytest

from llm_trainer.parallel.ds_config import (
    DsActivationCheckpointingConfig, DsBf16Config, DsConfig, DsFlopsProfilerConfig, DsFp16Config,
    DsOffloadConfig, DsZero0Config, DsZero1Config, DsZero2Config, DsZero3Config,
)

ALL = [DsActivationCheckpointingConfig, DsBf16Config, DsConfig, DsFlopsProfilerConfig, DsFp16Config,
       DsOffloadConfig, DsZero0Config, DsZero1Config, DsZero2Config, DsZero3Config]


@pytest.mark.parametrize("cls", ALL)
def test_every_default_constructs(cls):
    cls()


def test_original_defaults_kept():
    c = DsConfig()
    assert isinstance(c.zero_config, DsZero3Config) and c.stage == 3
    assert c.gradient_clipping == 1.0 and c.activation_checkpointing is None and c.flops_profiler is None
    z = DsZero3Config()
    assert (z.stage3_prefetch_bucket_size, z.stage3_param_persistence_threshold) == ("auto", "auto")
    assert z.stage3_gather_16bit_weights_on_model_save is True and z.zero_hpz_partition_size == 1
    assert DsOffloadConfig().device == "cpu" and DsFp16Config().enabled == "auto" and DsBf16Config().enabled


def test_stage_is_fixed_per_class():
    assert [z().stage for z in (DsZero0Config, DsZero1Config, DsZero2Config, DsZero3Config)] == [0, 1, 2, 3]
    with pytest.raises(TypeError):
        DsZero2Config(stage=3)


def test_basic_dict():
    d = DsConfig(zero_config=DsZero2Config(), gradient_clipping=0.5).to_ds_dict(4, 8, "bf16")
    assert d["train_micro_batch_size_per_gpu"] == 4 and d["gradient_accumulation_steps"] == 8
    assert d["gradient_clipping"] == 0.5
    assert d["bf16"] == {"enabled": True} and "fp16" not in d
    assert "optimizer" not in d and "scheduler" not in d  # always a client optimizer
    z = d["zero_optimization"]
    assert z == {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 500000000,
                 "overlap_comm": True, "reduce_scatter": True, "reduce_bucket_size": 500000000,
                 "contiguous_gradients": True, "ignore_unused_parameters": False}
    json.dumps(d)  # plain JSON types only


def test_grad_clip_argument_overrides_and_zero_disables():
    c = DsConfig(gradient_clipping=1.0)
    assert c.to_ds_dict(1, 1, "fp32", grad_clip=0.3)["gradient_clipping"] == 0.3
    assert DsConfig(gradient_clipping=None).to_ds_dict(1, 1, "fp32")["gradient_clipping"] == 0.0


def test_dtype_sections():
    c = DsConfig(zero_config=DsZero1Config())
    assert "bf16" not in c.to_ds_dict(1, 1, "fp32") and "fp16" not in c.to_ds_dict(1, 1, "fp32")
    fp16 = c.to_ds_dict(1, 1, "fp16")["fp16"]
    assert fp16 == {"enabled": True, "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
                    "hysteresis": 2, "min_loss_scale": 1}
    assert c.to_ds_dict(1, 1, None)["bf16"] == {"enabled": True}  # dtype None: bf16 allowed by default
    assert "bf16" not in DsConfig(bf16_config=DsBf16Config(enabled=False)).to_ds_dict(1, 1, None)
    assert "fp16" in DsConfig(fp16_config=DsFp16Config(enabled=True)).to_ds_dict(1, 1, None)
    with pytest.raises(ValueError, match="bf16"):
        DsConfig(bf16_config=DsBf16Config(enabled=False)).to_ds_dict(1, 1, "bf16")
    import torch
    assert "bf16" in c.to_ds_dict(1, 1, torch.bfloat16)


def test_zero3_fields_and_auto_resolution():
    z = DsZero3Config(zero_quantized_weights=True, zero_quantized_gradients=True, zero_hpz_partition_size=8,
                      stage3_max_live_parameters=3e8, stage3_max_reuse_distance=2e8, sub_group_size=5e8,
                      stage3_gather_16bit_weights_on_model_save=False, reduce_bucket_size="auto")
    d = DsConfig(zero_config=z).to_ds_dict(1, 1, "bf16", hidden_size=100)["zero_optimization"]
    assert d["stage"] == 3
    assert d["stage3_prefetch_bucket_size"] == 9000 and d["stage3_param_persistence_threshold"] == 1000
    assert d["reduce_bucket_size"] == 10000
    assert d["zero_quantized_weights"] and d["zero_quantized_gradients"] and d["zero_hpz_partition_size"] == 8
    assert d["stage3_max_live_parameters"] == 300000000 and d["stage3_max_reuse_distance"] == 200000000
    assert d["sub_group_size"] == 500000000 and d["stage3_gather_16bit_weights_on_model_save"] is False
    assert d["memory_efficient_linear"] is True
    # unresolved 'auto' (no hidden size): left to DeepSpeed
    d = DsConfig().to_ds_dict(1, 1, "bf16")["zero_optimization"]
    assert "stage3_prefetch_bucket_size" not in d and "stage3_param_persistence_threshold" not in d


def test_offload_sections():
    z = DsZero3Config(offload_optimizer=DsOffloadConfig(),
                      offload_param=DsOffloadConfig(device="nvme", nvme_path="/nvme", buffer_count=4,
                                                    buffer_size=10**7, max_in_cpu=10**8, pin_memory=False))
    d = DsConfig(zero_config=z).to_ds_dict(1, 1, "bf16")["zero_optimization"]
    assert d["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert d["offload_param"] == {"device": "nvme", "pin_memory": False, "nvme_path": "/nvme", "buffer_count": 4,
                                  "buffer_size": 10**7, "max_in_cpu": 10**8}
    d2 = DsConfig(zero_config=DsZero2Config(offload_optimizer=DsOffloadConfig(device="nvme", nvme_path="/x")))
    assert d2.to_ds_dict(1, 1)["zero_optimization"]["offload_optimizer"] == {
        "device": "nvme", "pin_memory": True, "nvme_path": "/x", "buffer_count": 5}


def test_activation_checkpointing_flops_profiler_and_misc():
    c = DsConfig(activation_checkpointing=DsActivationCheckpointingConfig(number_checkpoints=4),
                 flops_profiler=DsFlopsProfilerConfig(enabled=True, output_file="flops.txt"),
                 wall_clock_breakdown=True, steps_per_print=50, grad_accum_dtype="fp32")
    d = c.to_ds_dict(2, 2, "bf16")
    assert d["activation_checkpointing"] == {"partition_activations": True, "cpu_checkpointing": False,
                                             "contiguous_memory_optimization": True, "number_checkpoints": 4,
                                             "synchronize_checkpoint_boundary": False, "profile": False}
    assert d["flops_profiler"] == {"enabled": True, "profile_step": 1, "module_depth": -1, "top_modules": 1,
                                   "detailed": True, "output_file": "flops.txt"}
    assert d["wall_clock_breakdown"] is True and d["steps_per_print"] == 50
    assert d["data_types"] == {"grad_accum_dtype": "fp32"}


@pytest.mark.parametrize("make", [
    lambda: DsOffloadConfig(device="gpu"),
    lambda: DsOffloadConfig(device="nvme"),  # needs nvme_path
    lambda: DsOffloadConfig(buffer_count=0),
    lambda: DsZero2Config(offload_param=DsOffloadConfig()),  # ZeRO-3 only
    lambda: DsZero2Config(offload_optimizer={"device": "cpu"}),
    lambda: DsZero1Config(reduce_bucket_size=-1),
    lambda: DsZero1Config(communication_data_type="int8"),
    lambda: DsZero3Config(zero_hpz_partition_size=0),
    lambda: DsZero3Config(stage3_prefetch_bucket_size="big"),
    lambda: DsFp16Config(enabled="yes"),
    lambda: DsFp16Config(loss_scale_window=0),
    lambda: DsFlopsProfilerConfig(profile_step=0),
    lambda: DsActivationCheckpointingConfig(number_checkpoints=0),
    lambda: DsConfig(zero_config=DsFp16Config()),
    lambda: DsConfig(gradient_clipping=-1.0),
    lambda: DsConfig(grad_accum_dtype="fp8"),
    lambda: DsConfig().to_ds_dict(0, 1),
    lambda: DsConfig().to_ds_dict(1, 0),
    lambda: DsConfig(zero_config=DsZero0Config(), grad_accum_dtype="fp32").to_ds_dict(1, 1, "bf16"),
])
def test_invalid_values_rejected(make):
    with pytest.raises((ValueError, TypeError)):
        make()


def test_round_trip_through_plain_dict():
    c = DsConfig(zero_config=DsZero3Config(offload_param=DsOffloadConfig(), zero_hpz_partition_size=2),
                 flops_profiler=DsFlopsProfilerConfig(), gradient_clipping=0.7)
    assert DsConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.parametrize("zero", [DsZero0Config(), DsZero1Config(), DsZero2Config(offload_optimizer=DsOffloadConfig()),
                                  DsZero3Config(offload_optimizer=DsOffloadConfig(), offload_param=DsOffloadConfig(),
                                                zero_quantized_weights=True)])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_deepspeed_parses_what_we_emit(zero, dtype):
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    full = DsConfig(zero_config=zero, activation_checkpointing=DsActivationCheckpointingConfig(),
                    flops_profiler=DsFlopsProfilerConfig(), steps_per_print=10)
    d = full.to_ds_dict(2, 3, dtype, hidden_size=64)
    parsed = ds_config.DeepSpeedConfig(d)  # no process group: world size 1
    assert parsed.zero_optimization_stage == zero.stage
    assert parsed.train_batch_size == 6
    assert parsed.gradient_clipping == 1.0
    assert parsed.bfloat16_config.enabled == (dtype == "bf16")
    assert parsed.float16_config.enabled == (dtype == "fp16") if hasattr(parsed, "float16_config") else True


def test_section_writers_and_auto_fields():
    """``to_ds_section`` writes a DeepSpeed JSON section; ``to_dict`` is only DsConfig's plain-dict serialiser."""
    for cls in (DsZero0Config, DsZero3Config, DsOffloadConfig, DsFp16Config, DsBf16Config,
                DsActivationCheckpointingConfig, DsFlopsProfilerConfig):
        assert hasattr(cls, "to_ds_section") and not hasattr(cls, "to_dict"), cls
    assert DsZero3Config().auto_fields() == ["stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"]
    assert DsZero2Config(reduce_bucket_size="auto").auto_fields() == ["reduce_bucket_size"]
    assert DsZero3Config(stage3_prefetch_bucket_size=1, stage3_param_persistence_threshold=0).auto_fields() == []
    assert DsZero3Config().to_ds_section(64)["stage3_param_persistence_threshold"] == 640
