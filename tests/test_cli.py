"""`python -m launcher` as a user runs it: a subprocess, Hydra's own flags, exit codes, no side effects."""
import json
import re

import pytest
from conftest import run_launcher

from launcher import ROOT
from launcher.errors import ConfigError
from launcher.usage import key_comments, usage


def test_dry_run_end_to_end_prints_the_plan_and_writes_nothing(tmp_path):
    res = run_launcher("strategy=zero3", "gpus=4", "dry_run=true", f"run_dir={tmp_path}/run")
    assert res.returncode == 0, res.stderr
    assert "strategy:  zero3 on cuda, backend deepspeed" in res.stdout
    assert "deepspeed --num_gpus 4" in res.stdout
    assert '"stage3_gather_16bit_weights_on_model_save": true' in res.stdout
    assert not (tmp_path / "run").exists()


def test_a_model_path_given_names_the_run_after_the_model(tmp_path):
    """model.path without model.name: the preset's name (tiny) would call the user's model tiny in run_dir."""
    (tmp_path / "llama-3.2-1b" / "model").mkdir(parents=True)
    res = run_launcher(f"model.path={tmp_path}/llama-3.2-1b/model", "dry_run=true", "gpus=1")
    assert res.returncode == 0, res.stderr
    assert re.search(r"run_dir: +\S+/runs/dpo-llama-3.2-1b-\d{8}-\d{6}\n", res.stdout), res.stdout[:500]
    named = run_launcher(f"model.path={tmp_path}/llama-3.2-1b/model", "model.name=mine", "dry_run=true", "gpus=1")
    assert re.search(r"run_dir: +\S+/runs/dpo-mine-\d{8}", named.stdout), named.stdout[:500]
    preset = run_launcher("model=llama-3.1-8b-instruct", f"model.path={tmp_path}/llama-3.2-1b/model", "dry_run=true",
                          "gpus=1")  # a preset chosen for its shape keeps its name
    assert re.search(r"run_dir: +\S+/runs/dpo-llama-3.1-8b-instruct-\d{8}", preset.stdout), preset.stdout[:500]


def test_a_model_is_named_after_the_meaningful_part_of_its_path():
    from omegaconf import OmegaConf

    from launcher.config import name_model_after_its_path

    for path, name in (("/data/models/final", "data"), ("/hub/models--Qwen--Qwen2.5-7B/snapshots/" + "a" * 40,
                                                         "Qwen2.5-7B"),
                       ("Qwen/Qwen2.5-7B-Instruct", "Qwen2.5-7B-Instruct"), ("/a/my model:v1", "my-model-v1")):
        cfg = OmegaConf.create({"model": {"path": path, "name": "tiny", "shape": {"hidden_size": 128}}})
        name_model_after_its_path(cfg, [f"model.path={path}"])
        assert (cfg.model.name, cfg.model.shape) == (name, None)  # the tiny preset's shape is not this model's


def test_an_added_key_nothing_reads_is_refused_and_engine_settings_pass():
    res = run_launcher("+train.foo=1", "dry_run=true", "gpus=1")
    assert res.returncode == 2 and "+train.foo=1: the launcher reads no key train.foo" in res.stderr, res.stderr
    passed = run_launcher("strategy=zero2", "+strategy.deepspeed.steps_per_print=7", "dry_run=true", "gpus=1")
    assert passed.returncode == 0 and '"steps_per_print": 7' in passed.stdout, passed.stderr[-500:]


def test_a_forced_key_is_refused_where_nothing_reads_it_and_sets_one_that_exists():
    """`++key=value` adds the key where the config lacks it (then nothing reads it) and sets it where it is."""
    from launcher.config import check_added_keys

    with pytest.raises(ConfigError, match=r"\+\+train.lr_sheduler=cosine: the launcher reads no key train.lr_sheduler"):
        check_added_keys(["++train.lr_sheduler=cosine"])
    check_added_keys(["++train.lr=1e-4", "++model.attn_implementation=eager", "++micro_batch=8",
                      "++strategy.deepspeed.steps_per_print=7", "++model.shape.head_dim=64"])  # each read somewhere
    res = run_launcher("++train.lr_sheduler=cosine", "dry_run=true", "gpus=1")
    assert res.returncode == 2 and "the launcher reads no key train.lr_sheduler" in res.stderr, res.stderr[-500:]


def test_unknown_group_option_is_hydras_message():
    res = run_launcher("strategy=zero9", "dry_run=true")
    assert res.returncode != 0
    assert "zero9" in res.stderr and "Available options" in res.stderr


def test_bad_value_exits_2_with_the_key():
    res = run_launcher("gpus=two", "dry_run=true")
    assert res.returncode == 2
    assert "launcher: error: gpus: gpus='two' is not a whole number" in res.stderr
    assert "Traceback" not in res.stderr


def test_existing_run_is_left_untouched(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {path: builtin:tiny}\n")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    before = {p.name: p.read_text() for p in run.iterdir()}
    res = run_launcher(f"run_dir={run}")
    assert res.returncode == 2
    assert "already holds a run. Use resume=auto" in res.stderr
    assert {p.name: p.read_text() for p in run.iterdir()} == before


def test_hydra_cfg_job_and_help():
    job = run_launcher("--cfg", "job", "strategy=zero2")
    assert job.returncode == 0 and "name: zero2" in job.stdout and "micro_batch:" in job.stdout
    helped = run_launcher("--help")
    assert helped.returncode == 0 and "strategy: auto, ddp, fsdp_qlora, zero2, zero3, zero3_offload" in helped.stdout
    planned = run_launcher("plan", "-h", "quant=4bit")
    assert planned.returncode == 0 and "quant: 4bit, 8bit, none  [4bit]" in planned.stdout


def test_help_text_lists_subcommands_groups_and_top_level_keys():
    text = usage([])
    for command in ("python -m launcher plan", "python -m launcher report <run_dir>",
                    'python -m launcher generate <run_dir> "prompt"'):
        assert re.search(rf"^  {re.escape(command)}.* {{2}}\S", text, re.M), command
    assert "  strategy: auto, ddp, fsdp_qlora, zero2, zero3, zero3_offload  [auto]" in text
    assert "  model: " in text and "tiny" in text.split("  model: ")[1].split("\n")[0]
    assert re.search(r"^  gpus=auto +GPUs per node: an int, or auto", text, re.M)
    assert re.search(r"^  train.lr=5e-05$", text, re.M)  # no comment in config.yaml, no trailing spaces
    assert re.search(r"^  train.padding_free=auto +only real tokens.*\(launcher/batching.py: ddp\)$", text, re.M)
    assert not re.search(r"^  (model|strategy|quant|hydra)\.", text, re.M)  # a group's contents are not top-level keys
    assert f"Config folders: {ROOT / 'conf'} (shipped)" in text


def test_help_text_follows_the_overrides():
    text = usage(["strategy=zero3", "gpus=4", "model=qwen2.5-7b-instruct"])
    assert "zero3_offload  [zero3]" in text and "[qwen2.5-7b-instruct]" in text
    assert re.search(r"^  gpus=4 ", text, re.M)


def test_key_comments_of_nested_and_continued_lines():
    text = """# header
a: 1        # first
b: x        # second,
            # continued
c: 3
train:
  lr: 5     # rate
hydra:
  run: {}
"""
    assert key_comments(text) == {"a": "first", "b": "second, continued", "train.lr": "rate"}


def test_help_with_a_bad_override_is_hydras_message():
    res = run_launcher("--help", "strategy=zero9")
    assert res.returncode == 2
    assert "Could not find 'strategy/zero9'" in res.stderr and "Traceback" not in res.stderr


def test_multirun_plans_each_strategy(tmp_path):
    res = run_launcher("-m", "strategy=zero2,zero3", "gpus=2", "dry_run=true", f"hydra.sweep.dir={tmp_path}/sweep",
                       f"run_dir={tmp_path}/" + "${strategy.name}")
    assert res.returncode == 0, res.stderr
    assert "strategy:  zero2 on cuda" in res.stdout and "strategy:  zero3 on cuda" in res.stdout


def test_shell_metacharacters_stay_values(tmp_path):
    marker = tmp_path / "pwned"
    res = run_launcher("dry_run=true", f"run_name='x;touch {marker}'", f"run_dir='{tmp_path}/$(touch {marker})'")
    assert res.returncode == 0, res.stderr
    assert not marker.exists()
    assert f"$(touch {marker})/config.yaml" in res.stdout


def test_plan_json_written_on_execution_matches_the_dry_run(tmp_path, cache_dir):
    """Executing writes what the dry run shows: config, accelerate config, the exact command, the plan."""
    run = tmp_path / "run"
    res = run_launcher(f"run_dir={run}", "train.max_steps=1", "save_steps=1", "data.max_rows=40", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    plan = json.loads((run / "plan.json").read_text())
    assert plan["argv"][:2] == ["torchrun", "--nnodes"]
    assert (run / "command.sh").read_text().endswith(" ".join(plan["argv"]) + "\n")
    assert {"config.yaml", "accelerate.yaml", "command.sh", "plan.json"} <= {p.name for p in run.iterdir()}


def test_planning_imports_no_training_library():
    """The dry run stays fast because planning never imports torch & co (timed in scripts/bench_dry_run.py)."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "launcher", "strategy=zero3", "gpus=8",
                          "dry_run=true"], capture_output=True, text=True)
    assert res.returncode == 0
    imported = {line.split("|")[-1].strip().split(".")[0] for line in res.stderr.splitlines() if "|" in line}
    assert "yaml" in imported  # the check sees imports at all
    assert not imported & {"torch", "transformers", "trl", "peft", "deepspeed", "accelerate", "datasets"}
