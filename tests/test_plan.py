"""Golden files of every strategy x backend x {1 node, 2 nodes}: the command, environment, decisions
and every rendered file. After an intended change: `make golden` (UPDATE_GOLDEN=1), then review
`git diff tests/golden`.
"""
import json
import os

import pytest
import yaml

from conftest import CPU_NODE, GPU_NODE, compose_cfg
from launcher import ROOT
from launcher.plan import build_plan
from launcher.errors import ConfigError
from launcher.strategies import STRATEGIES

GOLDEN = ROOT / "tests" / "golden"
CASES = [(s, b, n) for s, spec in STRATEGIES.items() for b in spec.backends for n in (1, 2)]


def plan_for(strategy, backend, nodes, *extra, machine=GPU_NODE):
    overrides = [f"strategy={strategy}", f"backend={backend}", "gpus=4", f"nodes={nodes}", *extra]
    if nodes > 1:
        overrides += ["master_addr=10.0.0.1", "node_rank=1"]
    return build_plan(compose_cfg(*overrides), machine, cwd="/work/project")


def golden_text(plan) -> str:
    train_plan = yaml.safe_load(plan.files["config.yaml"])["plan"]
    parts = [f"# argv\n{json.dumps(plan.argv)}", f"# env\n{json.dumps(plan.env, sort_keys=True)}",
             "# decisions\n" + "\n".join(plan.decisions),
             "# config.yaml: plan\n" + yaml.safe_dump(train_plan, sort_keys=True)]
    parts += [f"# {name}\n{plan.files[name]}" for name in sorted(plan.files) if name != "config.yaml"]
    return "\n".join(parts)


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"{path} missing: run `make golden` and review the new file"
    assert text == path.read_text(), f"{name} differs from the golden file (make golden, then review git diff)"


@pytest.mark.parametrize("strategy,backend,nodes", CASES, ids=[f"{s}-{b}-{n}node" for s, b, n in CASES])
def test_golden(strategy, backend, nodes):
    check_golden(f"{strategy}-{backend}-{nodes}node.txt", golden_text(plan_for(strategy, backend, nodes)))


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_golden_qlora(quant):
    strategy = "fsdp_qlora" if quant == "4bit" else "ddp"
    plan = plan_for(strategy, "accelerate", 1, f"quant={quant}")
    check_golden(f"{strategy}-{quant}.txt", golden_text(plan))


def test_golden_cpu_default():
    check_golden("cpu-default.txt", golden_text(build_plan(compose_cfg(), CPU_NODE, cwd="/work/project")))


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_shipped_files_equal_default_rendering(strategy):
    """accelerate_configs/ and ds_configs/ are what the generator renders for 1 node x 2 GPUs, bf16."""
    plan = plan_for(strategy, STRATEGIES[strategy].backends[0], 1, "gpus=2")
    rendered = yaml.safe_load(plan.files["accelerate.yaml"])
    shipped = yaml.safe_load((ROOT / "accelerate_configs" / f"{strategy}.yaml").read_text())
    if "deepspeed_config" in rendered:
        assert rendered["deepspeed_config"]["deepspeed_config_file"] == "/runs/golden/ds_config.json"
        rendered["deepspeed_config"]["deepspeed_config_file"] = f"ds_configs/{strategy}.json"
        assert json.loads(plan.files["ds_config.json"]) == json.loads((ROOT / "ds_configs" / f"{strategy}.json").read_text())
    assert rendered == shipped


def test_zero3_with_4bit_stores_in_compute_dtype_and_skips_zero_init():
    plan = plan_for("zero3", "deepspeed", 1, "quant=4bit")
    train_plan = yaml.safe_load(plan.files["config.yaml"])["plan"]
    assert train_plan["quant_storage_dtype"] == "bfloat16"
    assert train_plan["zero3_init"] is False
    assert train_plan["device_map"] is None
    assert json.loads(plan.files["ds_config.json"])["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]


def test_ddp_4bit_keeps_uint8_storage_and_local_device_map():
    train_plan = yaml.safe_load(plan_for("ddp", "torchrun", 1, "quant=4bit").files["config.yaml"])["plan"]
    assert train_plan["quant_storage_dtype"] == "uint8"
    assert train_plan["device_map"] == "local_rank"


def test_paged_optimizer_is_replaced_under_sharding_and_kept_under_ddp():
    zero = yaml.safe_load(plan_for("zero2", "deepspeed", 1, "train.optim=paged_adamw_8bit").files["config.yaml"])
    ddp = yaml.safe_load(plan_for("ddp", "accelerate", 1, "train.optim=paged_adamw_8bit").files["config.yaml"])
    assert zero["plan"]["optim"] == "adamw_torch"
    assert any("paged_adamw_8bit -> adamw_torch" in d for d in zero["plan"]["decisions"])
    assert ddp["plan"]["optim"] == "paged_adamw_8bit"


def test_fp16_on_gpus_without_bf16():
    from launcher.machine import Machine

    v100 = Machine(gpu_count=4, gpu_name="Tesla V100", gpu_mem_gib=32, bf16=False, free_port=29555)
    plan = plan_for("fsdp_qlora", "accelerate", 1, "quant=4bit", machine=v100)
    assert yaml.safe_load(plan.files["accelerate.yaml"])["mixed_precision"] == "fp16"
    assert yaml.safe_load(plan.files["config.yaml"])["plan"]["quant_storage_dtype"] == "float16"


def test_fsdp_settings_for_the_trainer_are_the_accelerate_file_s():
    plan = plan_for("fsdp_qlora", "torchrun", 1, "strategy.cpu_offload=true")
    acc = yaml.safe_load(plan.files["accelerate.yaml"])
    assert acc["fsdp_config"]["fsdp_offload_params"] is True
    assert yaml.safe_load(plan.files["config.yaml"])["plan"]["fsdp_config"] == acc["fsdp_config"]


def test_your_deepspeed_and_fsdp_settings_are_laid_over_the_shipped_files():
    plan = plan_for("zero3", "deepspeed", 1, "+strategy.deepspeed.zero_optimization.stage3_prefetch_bucket_size=100000000",
                    "+strategy.deepspeed.steps_per_print=10")
    ds = json.loads(plan.files["ds_config.json"])
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == 100000000 and ds["steps_per_print"] == 10
    assert ds["zero_optimization"]["overlap_comm"] is True  # the shipped settings beside them stay
    assert "zero_optimization.stage3_prefetch_bucket_size=100000000: yours, laid over the shipped config" in plan.decisions
    auto = plan_for("auto", "deepspeed", 1, "+strategy.deepspeed.steps_per_print=10")
    assert auto.strategy == "zero2" and json.loads(auto.files["ds_config.json"])["steps_per_print"] == 10
    fsdp = plan_for("fsdp_qlora", "torchrun", 1, "quant=4bit", "+strategy.fsdp.fsdp_sharding_strategy=SHARD_GRAD_OP")
    acc = yaml.safe_load(fsdp.files["accelerate.yaml"])["fsdp_config"]
    assert acc["fsdp_sharding_strategy"] == "SHARD_GRAD_OP" and acc["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert yaml.safe_load(fsdp.files["config.yaml"])["plan"]["fsdp_config"] == acc  # torchrun: the Trainer's too


def test_strategy_auto_is_decided_by_the_memory_plan():
    from dataclasses import replace

    plan = plan_for("auto", "accelerate", 1)
    assert plan.strategy == "ddp"  # measured fastest (docs/benchmarks.md) and it fits
    assert any(d.startswith("strategy=auto -> ddp: the fastest that fits") for d in plan.decisions)
    deepspeed = plan_for("auto", "deepspeed", 1)  # the deepspeed launcher: the fastest DeepSpeed strategy
    assert deepspeed.strategy == "zero2"
    assert any(d.startswith("strategy=auto -> zero2: the fastest that fits") and d.endswith(
        "among the DeepSpeed ones (backend=deepspeed or strategy.deepspeed settings)") for d in deepspeed.decisions)
    assert plan_for("auto", "accelerate", 1, "+strategy.deepspeed.steps_per_print=10").strategy == "zero2"
    without_deepspeed = plan_for("auto", "accelerate", 1, machine=replace(GPU_NODE, deepspeed=False))
    assert without_deepspeed.strategy == "ddp"


def test_command_script_quotes_values(tmp_path):
    plan = build_plan(compose_cfg("run_dir='/runs/a b;$(touch x)'"), CPU_NODE, cwd="/work/my project")
    script = plan.files["command.sh"]
    assert "cd '/work/my project'" in script
    assert "'/runs/a b;$(touch x)/config.yaml'" in script


def test_every_node_joins_one_rendezvous_whatever_time_each_took_for_its_run_name():
    """Seen on the two-host cluster: node 0 at 19:53:07, node 1 at :08, two rendezvous ids, a 600 s wait."""
    def rdzv_id(node_rank, run_name):
        cfg = compose_cfg("backend=torchrun", "nodes=2", "master_addr=10.0.0.1", f"node_rank={node_rank}",
                          f"run_name={run_name}")
        argv = build_plan(cfg, GPU_NODE, cwd="/work/project").argv
        return argv[argv.index("--rdzv-id") + 1]
    assert rdzv_id(0, "dpo-20261130-195307") == rdzv_id(1, "dpo-20261130-195308") == "launcher-10-0-0-1-29500"


def test_golden_slurm_submission():
    overrides = ["cluster=slurm", "nodes=4", "gpus=8", "strategy=zero3", "model=qwen2.5-7b-instruct"]
    plan = build_plan(compose_cfg(*overrides), GPU_NODE, cwd="/work/project", overrides=overrides)
    text = plan.files["job.sbatch"].replace(str(ROOT), "<root>")
    check_golden("slurm-4node.txt", f"# argv\n{json.dumps(plan.argv)}\n# job.sbatch\n{text}")


def test_zero3_fetches_whole_layers_with_lora_by_default():
    def whole(*extra, strategy="zero3"):
        return yaml.safe_load(plan_for(strategy, "deepspeed" if "zero" in strategy else "accelerate", 1,
                                       *extra).files["config.yaml"])["plan"]["zero3_whole_layers"]

    assert whole() and whole(strategy="zero3_offload") and whole("method=sft", "data=demo_sft")  # with LoRA
    assert not whole("strategy.fetch_whole_layers=false") and not whole("lora=none") and not whole(strategy="ddp")
    with pytest.raises(ConfigError, match="strategy.fetch_whole_layers=true is tested only with LoRA"):
        whole("lora=none", "strategy.fetch_whole_layers=true")


def test_ddp_feeds_its_float32_adapters_the_bf16_activations_on_gpus_only():
    def plan(strategy, *extra):
        return yaml.safe_load(plan_for(strategy, "deepspeed" if "zero" in strategy else "accelerate", 1,
                                       *extra).files["config.yaml"])["plan"]

    ddp = plan("ddp")
    assert ddp["adapter_input_cast"] is False
    assert any(d.startswith("LoRA's float32 weights take the bfloat16 activations as they are") for d in ddp["decisions"])
    assert plan("zero2")["adapter_input_cast"] is True  # DeepSpeed trains bf16 adapters: nothing is cast
    assert plan("ddp", "lora=none")["adapter_input_cast"] is True  # no adapter
    cpu = build_plan(compose_cfg("cpu_procs=2"), CPU_NODE)
    assert yaml.safe_load(cpu.files["config.yaml"])["plan"]["adapter_input_cast"] is True  # float32 throughout


def test_lora_sum_is_fused_where_the_adapter_weights_are_whole_at_forward():
    def fused(strategy, *extra):
        backend = "deepspeed" if "zero" in strategy else "accelerate"
        return yaml.safe_load(plan_for(strategy, backend, 1, *extra).files["config.yaml"])["plan"]["fuse_lora_sum"]

    assert fused("ddp") and fused("zero2")
    assert not fused("zero3") and not fused("fsdp_qlora")  # weights gathered in module hooks
    assert not fused("ddp", "quant=4bit") and not fused("ddp", "lora=none")  # bitsandbytes' LoRA layers; no LoRA
    assert not fused("zero2", "train.fuse_lora_sum=false")
    with pytest.raises(ConfigError, match="train.fuse_lora_sum=true needs LoRA on unquantized weights"):
        fused("zero3", "train.fuse_lora_sum=true")
    with pytest.raises(ConfigError, match=r"train.fuse_lora_sum='yes': give true, false or auto"):
        fused("ddp", "train.fuse_lora_sum=yes")
    with pytest.raises(ConfigError, match=r"train.step_clock='auto': give true or false"):
        plan_for("ddp", "accelerate", 1, "train.step_clock=auto")


def test_batches_are_collated_by_two_workers_per_rank_on_gpus_and_by_the_rank_on_the_cpu():
    def workers(*extra, cfg=None):
        plan = plan_for("ddp", "accelerate", 1, *extra) if cfg is None else build_plan(cfg, CPU_NODE)
        return yaml.safe_load(plan.files["config.yaml"])["plan"]["dataloader_workers"]

    assert workers() == 2 and workers("train.dataloader_workers=0") == 0 and workers("train.dataloader_workers=5") == 5
    assert workers(cfg=compose_cfg("cpu_procs=2")) == 0  # two cores: a worker would take one from a rank
    with pytest.raises(ConfigError, match=r"train.dataloader_workers='two' must be a whole number >= 0 or auto"):
        workers("train.dataloader_workers=two")


def test_host_work_is_trimmed_unless_turned_off():
    def trimmed(*extra):
        return yaml.safe_load(plan_for("zero3", "deepspeed", 1, *extra).files["config.yaml"])["plan"]["trim_host_work"]

    assert trimmed() and not trimmed("train.trim_host_work=false")
    cpu = build_plan(compose_cfg("cpu_procs=2"), CPU_NODE)
    assert yaml.safe_load(cpu.files["config.yaml"])["plan"]["trim_host_work"] is True
    with pytest.raises(ConfigError, match=r"train.trim_host_work='auto': give true or false"):
        trimmed("train.trim_host_work=auto")


def test_adapters_in_layer_units_render_use_orig_params_and_adapters_in_the_compute_dtype():
    plan = plan_for("fsdp_qlora", "accelerate", 1, "strategy.adapters_in_layer_units=true")
    acc = yaml.safe_load(plan.files["accelerate.yaml"])["fsdp_config"]
    settings = yaml.safe_load(plan.files["config.yaml"])["plan"]
    assert acc["fsdp_use_orig_params"] is True and settings["fsdp_config"] == acc
    assert settings["fsdp_adapters_in_layers"] is True and settings["trainable_dtype"] == "bfloat16"
    assert any(d.startswith("each decoder layer is one FSDP unit with its LoRA matrices") for d in plan.decisions)
    default = yaml.safe_load(plan_for("fsdp_qlora", "accelerate", 1).files["config.yaml"])["plan"]
    assert default["fsdp_config"]["fsdp_use_orig_params"] is False and not default["fsdp_adapters_in_layers"]
    assert default["trainable_dtype"] is None  # PEFT's float32 adapters, each a unit of its own
    with pytest.raises(ConfigError, match="lora=none trains no adapter"):
        plan_for("fsdp_qlora", "accelerate", 1, "strategy.adapters_in_layer_units=true", "lora=none")
    with pytest.raises(ConfigError, match="strategy.adapters_in_layer_units='yes': give true or false"):
        plan_for("fsdp_qlora", "accelerate", 1, "strategy.adapters_in_layer_units=yes")
    with pytest.raises(ConfigError, match="adapters_in_layer_units=true needs 2 or more processes"):
        plan_for("fsdp_qlora", "accelerate", 1, "strategy.adapters_in_layer_units=true", "gpus=1")


def test_metrics_sync_at_log_is_planned_only_where_there_are_ranks_to_sync():
    def sync(*extra, cfg=None):
        plan = plan_for("ddp", "accelerate", 1, *extra) if cfg is None else build_plan(cfg, CPU_NODE)
        return yaml.safe_load(plan.files["config.yaml"])["plan"]["metrics_sync"], plan.decisions

    # TRL's gathers at every step, unless asked, or unless the ranks' micro-batches hold different numbers of pairs
    assert sync("micro_batch_tokens=null")[0] == "step" and sync()[0] == "log"  # (tests/test_batching.py)
    synced, decisions = sync("train.metrics_sync=log", "micro_batch_tokens=null")
    assert synced == "log" and any(d.startswith("training metrics stay on each rank until a log") for d in decisions)
    assert sync("train.metrics_sync=log", "gpus=1")[0] == "step"  # one process: nothing to gather
    assert sync(cfg=compose_cfg("cpu_procs=2", "train.metrics_sync=log"))[0] == "log"
    with pytest.raises(ConfigError, match=r"train.metrics_sync='never': give step .* or log"):
        sync("train.metrics_sync=never")
