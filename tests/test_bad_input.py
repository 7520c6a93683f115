"""The catalogue of bad input (docs/reliability.md): each case names what to fix, exits non-zero, and
leaves an existing run directory exactly as it was."""
import json
from pathlib import Path

import pytest
import yaml

from conftest import compose_cfg, run_launcher

LONG_PROMPT = " ".join(["What is the capital of France and why"] * 20)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    rows = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(20)]
    (d / "no_rejected.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": "a"}) + "\n" for r in rows))
    (d / "empty.jsonl").write_text("")
    (d / "garbage.jsonl").write_bytes(b"\xff\xfe\x00\x81binary\x00\x00\n" * 10)
    (d / "corrupt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + '{"prompt": "x", "chosen": \n')
    (d / "long.jsonl").write_text("".join(json.dumps({"prompt": LONG_PROMPT + str(i), "chosen": "a", "rejected": "b"})
                                          + "\n" for i in range(20)))
    (d / "weights.bin").write_text("not a model directory")
    return d


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory):
    """A run directory as a finished DPO run leaves it: config, logs, a complete checkpoint with an r=8 adapter."""
    run = tmp_path_factory.mktemp("existing") / "run"
    (run / "checkpoints" / "checkpoint-10").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(compose_cfg(f"run_dir={run}")))
    (run / "metrics.jsonl").write_text('{"step": 10, "loss": 0.5}\n')
    (run / "checkpoints" / "checkpoint-10" / "COMPLETE").write_text("10\n")
    (run / "checkpoints" / "checkpoint-10" / "trainer_state.json").write_text('{"global_step": 10}')  # as saved
    (run / "checkpoints" / "checkpoint-10" / "adapter_config.json").write_text(
        json.dumps({"r": 8, "base_model_name_or_path": "somewhere/else/model"}))
    return run


def snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


CASES = [
    # (overrides, exit code, words in stderr)
    (["strategy=zero9"], 1, "Could not find 'strategy/zero9'"),
    (["gpus=two"], 2, "gpus='two' is not a whole number"),
    (["micro_batch=0"], 2, "micro_batch=0 must be >= 1"),
    (["save_steps=-5"], 2, "save_steps=-5 must be >= 1"),
    (["data.max_length=16", "data.path={d}/long.jsonl"], 2, "every prompt is at least data.max_length=16"),
    (["data.path={d}/no_rejected.jsonl"], 2, "no_rejected.jsonl: DPO needs columns prompt, chosen, rejected; "
                                             "missing rejected"),
    (["data.path={d}/no_rejected.jsonl", "start_ranks_early=false"], 2, "missing rejected"),  # checks, then ranks
    (["data.path={d}/empty.jsonl"], 2, "empty.jsonl"),
    (["data.path={d}/garbage.jsonl"], 2, "garbage.jsonl: cannot be read"),
    (["data.path={d}/corrupt.jsonl"], 2, "Line 3 is not valid JSON"),
    (["train.optim=adamw_fused"], 2, "train.optim=adamw_fused: not an optimizer transformers knows"),
    (["train.lr_scheduler=cosin"], 2, "train.lr_scheduler=cosin: not a scheduler transformers knows"),
    (["lora.alpha=0"], 2, "lora.alpha=0: give a number > 0"),  # PEFT would train an adapter that changes nothing
    (["model.chat_template=/nonexistent/file.jinja"], 2, "model.chat_template=/nonexistent/file.jinja is no file"),
    (["data.path={d}/missing.jsonl"], 2, "data.path: data.path={d}/missing.jsonl does not exist"),
    (["model.path={d}/weights.bin"], 2, "is a file; give the directory that holds config.json"),
    (["method=sft", "data=demo_sft"], 2, "holds a different run (method.name: 'dpo' there, 'sft' now"),
    (["model=qwen2.5-7b-instruct"], 2, "holds a different run (model.path"),
    ([], 2, "checkpoint-10 does not fit this config: LoRA r=8 there, lora.r=16 here"),
    (["resume=null"], 2, "already holds a run. Use resume=auto to continue it"),
    (["run_name='x;$(touch {d}/pwned)'", "data.path={d}/no_rejected.jsonl"], 2, "missing rejected"),
]


@pytest.mark.parametrize("overrides,code,words", CASES, ids=[" ".join(c[0]) or "lora-shape" for c in CASES])
def test_bad_input_is_refused_and_the_run_dir_is_untouched(existing_run, files, overrides, code, words):
    before = snapshot(existing_run)
    res = run_launcher(f"run_dir={existing_run}", "resume=auto", *[o.format(d=files) for o in overrides],
                       timeout=300)
    assert res.returncode == code, res.stdout[-2000:] + res.stderr[-2000:]
    assert words.format(d=files) in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert snapshot(existing_run) == before
    assert not (files / "pwned").exists()


@pytest.mark.slow
def test_no_secret_reaches_any_file_the_launcher_writes(tmp_path, tiny_dir):
    secrets = {"WANDB_API_KEY": "wandb-secret-3f9a1c77e2b14d0c", "HF_TOKEN": "hf_secretTokenValue8d21"}
    run = tmp_path / "run"
    res = run_launcher(f"run_dir={run}", "logging=wandb", "train.max_steps=2", "save_steps=2", "data.max_rows=60",
                       env=secrets, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    written = [p for p in run.rglob("*") if p.is_file()]
    assert any("wandb" in str(p) for p in written) and any(p.name == "training_args.bin" for p in written)
    for path in written:
        data = path.read_bytes()
        for name, value in secrets.items():
            assert value.encode() not in data, f"{name} found in {path}"
    for value in secrets.values():
        assert value not in res.stdout + res.stderr
