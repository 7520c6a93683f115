"""The run report (launcher/report.py) and the sample answers behind it (launcher/samples.py): written by the
launcher after a real 2-process run, rendered in a real headless Chromium, and written for runs still going or
failed."""
import html as html_text
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import run_launcher
from launcher import execute, postmortem, report

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def train_once(base: Path) -> Path:
    """A finished DPO + LoRA run, shared by this module and test_generate.py (the second caller finds it done).
    lr 5e-3 for 20 steps moves the adapter far enough that the tuned answers differ from the base's."""
    run = base / "finished-run"
    if not (run / "summary.json").exists():
        res = run_launcher(f"run_dir={run}", "train.max_steps=20", "train.lr=5e-3", "overwrite=true", timeout=600)
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
        (run / "launcher.out").write_text(res.stdout)
    return run


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_dir) -> Path:
    return train_once(tmp_path_factory.getbasetemp())


def screenshot(page: Path, png: Path, profile: Path) -> None:
    # as root Chromium refuses to start sandboxed; its own profile dir so parallel runs never share one
    res = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1200,3000",
                          page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and png.exists(), res.stderr[-3000:]


def colourful_pixels(png: Path) -> tuple[int, int, int]:
    """(pixels of a saturated colour, pixels not near white, distinct colours). The plots' lines are matplotlib's
    blue, orange, green, ...; the page around them is black and grey text on white and pale boxes."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(np.int64)
    saturated = int((pixels.max(1) - pixels.min(1) > 80).sum())
    inked = int((pixels.min(1) < 200).sum())
    return saturated, inked, len(np.unique(pixels[:, 0] << 16 | pixels[:, 1] << 8 | pixels[:, 2]))


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium here: `make chromium` installs Debian's (as root)")
def test_the_report_shows_its_plots_in_a_real_browser(finished_run, tmp_path):
    page = finished_run / "report.html"
    assert f"launcher: report: {page}" in (finished_run / "launcher.out").read_text()  # written by the launcher
    html = page.read_text()
    assert html.count("src='data:image/png;base64,") >= 6  # loss, rewards, accuracy, logps, tokens/s, lr, ...
    assert "<script" not in html and not re.search(r"(src|href)=['\"]?(https?:|//)", html)  # nothing to fetch
    stripped = tmp_path / "no-images.html"
    stripped.write_text(re.sub(r"<img [^>]*>", "", html))
    screenshot(page, tmp_path / "report.png", tmp_path / "profile1")
    screenshot(stripped, tmp_path / "no-images.png", tmp_path / "profile2")
    with_plots, without = colourful_pixels(tmp_path / "report.png"), colourful_pixels(tmp_path / "no-images.png")
    assert with_plots[1] > 0.01 * 1200 * 3000 and with_plots[1] > 1.5 * without[1], (with_plots, without)  # ink
    assert with_plots[0] > 5000 and without[0] < with_plots[0] / 10, (with_plots, without)  # the colour: the plots'
    assert with_plots[2] > 3 * without[2], (with_plots, without)  # antialiased curves: many more colours


@pytest.mark.slow
def test_samples_answer_held_out_prompts_with_the_tuned_and_the_base_model(finished_run):
    samples = json.loads((finished_run / "samples.json").read_text())
    assert samples["base"] == "the same model with its LoRA adapter disabled" and samples["max_new_tokens"] == 48
    assert len(samples["samples"]) == 3
    for sample in samples["samples"]:
        assert sample["prompt_text"].startswith("<|im_start|>user\n")  # the tiny model's ChatML template
        assert sample["prompt_text"].endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert sample["prompt"][0]["content"] in sample["prompt_text"] and sample["reference"]
        assert isinstance(sample["tuned"], str) and sample["tuned"] and isinstance(sample["base"], str)
    assert any(s["tuned"] != s["base"] for s in samples["samples"])  # the adapter changed what the model says
    html = (finished_run / "report.html").read_text()
    first = samples["samples"][0]
    assert html_text.escape(first["tuned"]) in html and html_text.escape(first["reference"]) in html


def partial_copy(finished_run: Path, dest: Path, steps: int) -> Path:
    """A run directory as the finished run's was after `steps` logged rows: no summary, no samples, and the next
    metrics line cut short as rank 0 writes it."""
    dest.mkdir()
    for name in ("config.yaml", "plan.json"):
        shutil.copy(finished_run / name, dest / name)
    lines = (finished_run / "metrics.jsonl").read_text().splitlines()
    (dest / "metrics.jsonl").write_text("\n".join(lines[:steps]) + "\n" + lines[steps][:40])
    (dest / "logs").mkdir()
    for rank in (0, 1):
        start = next(line for line in (finished_run / "logs" / f"rank{rank}.log").read_text().splitlines()
                     if postmortem.STARTED in line)
        (dest / "logs" / f"rank{rank}.log").write_text(start + "\n")
    return dest


@pytest.mark.slow
def test_report_of_a_run_still_going(finished_run, tmp_path):
    run = partial_copy(finished_run, tmp_path / "going", steps=2)
    res = subprocess.run([sys.executable, "-m", "launcher.report", str(run)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"report: {run / 'report.html'}"
    html = (run / "report.html").read_text()
    assert "class='state running'" in html and "the run has not finished" in html
    assert "last logged step</th><td>10<" in html  # rows at steps 5 and 10; the cut line is left out
    assert html.count("data:image/png;base64,") >= 6
    assert "No sample answers" in html and f"python -m launcher generate {run}" in html


@pytest.mark.slow
def test_report_of_a_failed_run_names_the_rank_that_failed(finished_run, tmp_path):
    run = partial_copy(finished_run, tmp_path / "failed", steps=3)
    with open(run / "logs" / "rank1.log", "a") as f:
        f.write(f"2026-01-01 10:00:00,000 rank1 launcher ERROR {postmortem.FAILED}\nTraceback (most recent call "
                "last):\n  File \"train.py\", line 1\nRuntimeError: CUDA out of memory on rank1\n")
    with open(run / "logs" / "rank0.log", "a") as f:
        f.write(f"2026-01-01 10:00:01,000 rank0 launcher WARNING {postmortem.STOPPED} SIGTERM\n")
    execute.write_report(SimpleNamespace(settings={"device": "cpu"}, node_rank=0, run_dir=str(run)), 1)
    html = (run / "report.html").read_text()
    assert "class='state failed'" in html
    assert re.search(r"first: rank1 failed( on \S+)? at 10:00:00.000: RuntimeError: CUDA out of memory on rank1", html)
    assert "rank0 was stopped because rank1 had gone" in html
    assert "last logged step</th><td>15<" in html


def test_a_report_that_cannot_be_written_is_a_warning_only(tmp_path, capsys):
    (tmp_path / "logs").mkdir()
    (tmp_path / "config.yaml").write_text("model: [unclosed\n")
    execute.write_report(SimpleNamespace(settings={"device": "cpu"}, node_rank=0, run_dir=str(tmp_path)), 0)
    err = capsys.readouterr().err
    assert "launcher: warning: no report written (" in err and f"python -m launcher report {tmp_path}" in err
    assert not (tmp_path / "report.html").exists()


def test_a_run_killed_without_a_word_is_failed_by_its_exit_code_not_running(finished_run, tmp_path):
    run = partial_copy(finished_run, tmp_path / "killed", steps=3)  # rank logs end mid-run, no summary
    assert report.run_state(run)[0] == "running"  # all the directory says
    assert report.run_state(run, exit_code=137)[0] == "failed"  # the launcher saw the ranks die


def test_report_of_a_directory_that_is_no_run_names_it(tmp_path, capsys):
    assert report.main([str(tmp_path / "nothing")]) == 2
    assert f"{tmp_path / 'nothing'}: no config.yaml and no metrics.jsonl" in capsys.readouterr().err
    assert report.main([]) == 2
