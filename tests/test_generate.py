"""`python -m launcher generate`: answers from a finished run's adapter on the CPU."""
import json
import subprocess
import sys

import pytest

from test_report import train_once


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_dir):
    return train_once(tmp_path_factory.getbasetemp())  # the same run as test_report.py's, trained once


def run_generate(*args):
    return subprocess.run([sys.executable, "-m", "launcher.generate", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_generate_answers_with_the_adapter_on_the_cpu(finished_run):
    samples = json.loads((finished_run / "samples.json").read_text())["samples"]
    prompts = [s["prompt"][0]["content"] for s in samples]
    res = run_generate(str(finished_run), *prompts, "--max-new-tokens", "48", "--base", "--device", "cpu")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"tuned model: {finished_run / 'final'} (adapter), on cpu" in res.stderr
    # the same weights, template, batch and greedy decoding as the answers written at the end of training
    assert res.stdout == "".join(f"=== prompt: {p}\n--- tuned:\n{s['tuned']}\n--- base:\n{s['base']}\n"
                                 for p, s in zip(prompts, samples))


def test_generate_names_a_directory_that_holds_no_run(tmp_path):
    res = run_generate(str(tmp_path), "hello", "--device", "cpu")
    assert res.returncode == 2 and f"{tmp_path / 'config.yaml'}: missing" in res.stderr
