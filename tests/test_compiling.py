"""train.compile (launcher/compiling.py): the decision and its refusals. The compiled training itself runs in
tests/test_train.py (the CPU, inductor) and on the GPU in the benchmark (docs/benchmarks.md)."""
import pytest
import yaml

from conftest import CPU_NODE, GPU_NODE, compose_cfg
from launcher.errors import ConfigError
from launcher.plan import build_plan


def planned(*overrides, machine=GPU_NODE):
    plan = build_plan(compose_cfg("model=qwen2.5-1.5b-instruct", *overrides), machine)
    lines = [d for d in plan.decisions if d.startswith("train.compile")]
    return yaml.safe_load(plan.files["config.yaml"])["plan"]["compile"], lines


def test_auto_leaves_the_layers_eager_saying_why():
    on, lines = planned("gpus=2")
    assert on is False and len(lines) == 1 and lines[0].startswith("train.compile=auto -> off: measured on an H200")
    on, lines = planned(machine=CPU_NODE)
    assert on is False and "the CPU runs too few steps" in lines[0]


def test_true_compiles_each_decoder_layer_and_false_says_nothing():
    on, lines = planned("gpus=2", "train.compile=true", "strategy=ddp")
    assert on is True and lines[0].endswith("the first step waits for it")
    on, lines = planned("gpus=2", "train.compile=true", "strategy=zero2", "quant=4bit")
    assert on is True and lines[0].endswith("(not run with strategy=zero2 and quant=4bit yet)")
    assert planned("gpus=2", "train.compile=false") == (False, [])


@pytest.mark.parametrize("overrides,words", [
    (["gpus=2", "train.compile=yes"], "give true, false or auto"),
    (["gpus=2", "train.compile=true", "strategy=fsdp_qlora"], "FSDP1 flattens the compiled layers"),
    (["gpus=2", "train.compile=true", "strategy=zero3"], "parameter-gathering hooks"),
])
def test_bad_compile_settings_are_refused_naming_the_key(overrides, words):
    with pytest.raises(ConfigError) as info:
        planned(*overrides)
    assert info.value.key == "train.compile" and words in str(info.value)
