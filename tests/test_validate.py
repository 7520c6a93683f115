"""Bad input is refused before anything starts, with a message that names the key and what to do."""
import pytest
import yaml

from conftest import CPU_NODE, GPU_NODE, compose_cfg
from launcher import validate
from launcher.errors import ConfigError
from launcher.plan import build_plan


def refused(*overrides, machine=GPU_NODE) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        build_plan(compose_cfg(*overrides), machine)
    return info.value


@pytest.mark.parametrize("overrides,key,words", [
    (["gpus=0"], "gpus", "must be >= 1"),
    (["gpus=two"], "gpus", "not a whole number"),
    (["gpus=9"], "gpus", "8 visible GPU"),
    (["nodes=0"], "nodes", ">= 1"),
    (["nodes=2"], "master_addr", "master_addr=<host of node 0>"),
    (["nodes=2", "master_addr=h", "node_rank=2"], "node_rank", "below nodes=2"),
    (["micro_batch=-4"], "micro_batch", ">= 1"),
    (["save_steps=0"], "save_steps", ">= 1"),
    (["train.max_steps=0"], "train.max_steps", ">= 1, or -1"),
    (["train.lr=-1"], "train.lr", "positive"),
    (["data.max_length=2"], "data.max_length", ">= 8"),
    (["train.profile_steps=[8,6]"], "train.profile_steps", "first and last step"),
    (["train.profile_steps=6"], "train.profile_steps", "train.profile_steps=[6,8]"),
    (["master_port=70000"], "master_port", "1-65535"),
    (["strategy=ddp", "backend=deepspeed"], "backend", "backend=accelerate or backend=torchrun"),
    (["backend=mpirun"], "backend", "not one of"),
    (["quant=4bit", "lora=none"], "lora", "Use lora=default"),
    (["quant=8bit", "strategy=zero3"], "quant", "quant=4bit"),
    (["quant=4bit", "strategy=fsdp_qlora", "quant.storage_dtype=uint8"], "quant.storage_dtype", "auto"),
    (["cluster=slurm", "gpus=0"], "gpus", "GPUs per node"),
    (["strategy=ddp", "+strategy.deepspeed.zero_optimization.stage=3"], "strategy.deepspeed", "strategy=zero2, zero3"),
    (["strategy=zero2", "+strategy.fsdp.fsdp_version=2"], "strategy.fsdp", "Use strategy=fsdp_qlora"),
    (["strategy=fsdp_qlora", "+strategy.fsdp.version=2"], "strategy.fsdp", "named fsdp_*"),
    # values the libraries would take without a word, or refuse only in the ranks
    (["lora.alpha=0"], "lora.alpha", "lora.alpha=0: give a number > 0 (or null)"),
    (["lora.r=0"], "lora.r", "lora.r=0: give a whole number >= 1 (or null)"),
    (["lora.r=sixteen"], "lora.r", "give a whole number >= 1"),
    (["lora.dropout=1.5"], "lora.dropout", "give a number >= 0 and < 1"),
    (["method.beta=-1"], "method.beta", "method.beta=-1: give a number > 0."),
    (["method.beta=abc"], "method.beta", "give a number > 0"),
    (["method.label_smoothing=2"], "method.label_smoothing", "give a number >= 0 and < 0.5"),
    (["method=simpo", "method.gamma=abc"], "method.gamma", "give a number >= 0"),
    (["seed=abc"], "seed", "seed='abc': give a whole number >= 0."),
    (["seed=-1"], "seed", "give a whole number >= 0"),
    (["data.test_fraction=1.5"], "data.test_fraction", "give a number > 0 and < 1"),
    (["data.max_rows=-1"], "data.max_rows", "give a whole number >= 1 (or null)"),
    (["train.warmup_ratio=-0.5"], "train.warmup_ratio", "give a number >= 0 and < 1"),
    (["train.weight_decay=abc"], "train.weight_decay", "give a number >= 0"),
    (["train.max_grad_norm=abc"], "train.max_grad_norm", "give a number >= 0 (or null)"),
    (["train.eval_steps=-1"], "train.eval_steps", "give a whole number >= 1 (or null)"),
    (["dry_run=maybe"], "dry_run", "dry_run='maybe': give true or false."),
    (["merge=maybe"], "merge", "give true or false"),
    (["data.conversational=maybe"], "data.conversational", "give true, false or auto"),
])
def test_refused_with_key_and_advice(overrides, key, words):
    err = refused(*overrides)
    assert err.key == key
    assert words in str(err)


def test_more_gpus_than_the_machine_is_fine_for_a_dry_run():
    plan = build_plan(compose_cfg("gpus=64", "dry_run=true"), GPU_NODE)
    assert plan.world_size == 64


@pytest.mark.parametrize("overrides,key", [
    (["strategy=zero3"], "strategy"), (["quant=4bit"], "quant"), (["backend=accelerate"], "backend"),
    (["gpus=1"], "gpus"),
])
def test_cpu_machine_refuses_gpu_only_work(overrides, key):
    assert refused(*overrides, machine=CPU_NODE).key == key


def test_cpu_machine_dry_run_plans_for_gpus():
    plan = build_plan(compose_cfg("strategy=zero3", "gpus=4", "dry_run=true"), CPU_NODE)
    assert plan.backend == "deepspeed" and plan.world_size == 4 and plan.device == "cuda"
    assert any("no GPU visible here" in d for d in plan.decisions)


def test_model_path_missing_or_a_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        validate.check_paths(compose_cfg(f"model.path={tmp_path}/nope"))
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ConfigError, match="is a file; give the directory"):
        validate.check_paths(compose_cfg(f"model.path={tmp_path}/weights.bin"))
    with pytest.raises(ConfigError, match=f"model.path={tmp_path} holds no config.json"):
        validate.check_paths(compose_cfg(f"model.path={tmp_path}"))
    (tmp_path / "config.json").write_text("{}")
    validate.check_paths(compose_cfg(f"model.path={tmp_path}"))  # a checkpoint's directory passes
    validate.check_paths(compose_cfg("model=qwen2.5-7b-instruct"))  # a hub id is checked at download


def test_a_chat_template_path_that_names_no_file_is_refused(tmp_path):
    """It would be taken as the template's text: every row rendered as the path itself, and nothing learned."""
    with pytest.raises(ConfigError, match=r"model.chat_template=/nonexistent/file.jinja is no file here"):
        validate.check_paths(compose_cfg("model.chat_template=/nonexistent/file.jinja"))
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    validate.check_paths(compose_cfg(f"model.chat_template={tmp_path}/t.jinja"))
    validate.check_paths(compose_cfg("model.chat_template='{% for m in messages %}{{ m.content }}{% endfor %}'"))


def test_missing_data_file_names_the_key(tmp_path):
    with pytest.raises(ConfigError) as info:
        validate.check_paths(compose_cfg(f"data.path={tmp_path}/missing.jsonl"))
    assert info.value.key == "data.path"


def _saved_run(tmp_path, *overrides):
    cfg = compose_cfg(f"run_dir={tmp_path}/run", *overrides)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "run"


def test_run_dir_states(tmp_path):
    assert validate.check_run_dir(compose_cfg(f"run_dir={tmp_path}/new")) == "new"
    run = _saved_run(tmp_path)
    with pytest.raises(ConfigError, match="already holds a run. Use resume=auto"):
        validate.check_run_dir(compose_cfg(f"run_dir={run}"))
    assert validate.check_run_dir(compose_cfg(f"run_dir={run}", "resume=auto")) == "resume"
    assert validate.check_run_dir(compose_cfg(f"run_dir={run}", "overwrite=true")) == "overwrite"
    with pytest.raises(ConfigError, match=r"different run \(method.name: 'dpo' there, 'sft' now"):
        validate.check_run_dir(compose_cfg(f"run_dir={run}", "resume=auto", "method=sft"))


def test_a_resume_is_told_what_changed_and_refused_another_adapter_scale(tmp_path):
    """lora.alpha scales what the saved adapter adds: another value changes what it computes, so it is refused as
    another r is. What is learned from, and how, may change, and the resume says what did."""
    run = _saved_run(tmp_path)
    with pytest.raises(ConfigError, match=r"different run \(lora.alpha: 32 there, 64 now"):
        validate.check_run_dir(compose_cfg(f"run_dir={run}", "resume=auto", "lora.alpha=64"))
    changed = validate.changed_since_last_launch(compose_cfg(f"run_dir={run}", "resume=auto", "train.lr=1e-4",
                                                             "data.path=/data/other.jsonl"))
    assert changed[0].startswith("data.path ") and changed[0].endswith("-> '/data/other.jsonl'")
    assert changed[1:] == ["train.lr 5e-05 -> 0.0001"]
    assert validate.changed_since_last_launch(compose_cfg(f"run_dir={run}", "resume=auto")) == []


def test_a_run_dir_left_with_only_a_half_written_file_is_new(tmp_path):
    """A launch that could not write its first file (a full disk) left it there: the run dir was then refused for
    good, even with overwrite=true, as holding no launcher run."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".config.yaml.tmp-4242").write_text("plan: {")
    assert validate.check_run_dir(compose_cfg(f"run_dir={tmp_path}/run")) == "new"


def test_run_dir_that_is_not_a_run_is_never_replaced(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no launcher run"):
        validate.check_run_dir(compose_cfg(f"run_dir={tmp_path}", "overwrite=true"))


def test_resume_path_must_be_a_complete_checkpoint(tmp_path):
    ckpt = tmp_path / "checkpoint-5"
    ckpt.mkdir()
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        validate.check_paths(compose_cfg(f"resume={ckpt}"))
    (ckpt / "COMPLETE").write_text("5\n")
    validate.check_paths(compose_cfg(f"resume={ckpt}"))


def test_a_run_dir_that_cannot_be_made_or_a_slurm_without_sbatch_is_refused(tmp_path, monkeypatch):
    """Found before the checks and the ranks start, not when the launcher first writes into run_dir."""
    with pytest.raises(ConfigError, match=r"run_dir=/proc/launcher-run cannot be made under /proc"):
        validate.check_run_dir(compose_cfg("run_dir=/proc/launcher-run"))
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="cannot be made under"):
        validate.check_run_dir(compose_cfg(f"run_dir={tmp_path}/a-file/run"))
    assert validate.check_run_dir(compose_cfg(f"run_dir={tmp_path}/new/run")) == "new"
    assert list(tmp_path.iterdir()) == [tmp_path / "a-file"]  # the check left nothing behind
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    with pytest.raises(ConfigError, match="cluster=slurm submits the job with sbatch, which is not on PATH here"):
        validate.check_run_dir(compose_cfg("cluster=slurm", f"run_dir={tmp_path}/job"))


def test_a_data_file_name_is_not_asked_of_the_hub_and_max_length_stays_within_the_models_positions(tmp_path):
    with pytest.raises(ConfigError, match="data.path=pairs.jsonl does not exist"):
        validate.check_paths(compose_cfg("data.path=pairs.jsonl"))
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 1024}')
    with pytest.raises(ConfigError, match=r"data.max_length=100000 is over the 1024 positions model.path=.* was built "
                                          r"for \(max_position_embeddings\): give data.max_length=1024 or less"):
        validate.check_paths(compose_cfg(f"model.path={tmp_path}", "data.max_length=100000"))
    validate.check_paths(compose_cfg(f"model.path={tmp_path}", "data.max_length=1024"))
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 1024, "rope_scaling": {"factor": 4.0}}')
    validate.check_paths(compose_cfg(f"model.path={tmp_path}", "data.max_length=4096"))  # stretched by its rope
