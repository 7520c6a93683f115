"""A non-editable install works anywhere: the wheel built from this checkout, installed into a fresh venv, run from
another directory. The venv reuses the dependencies already installed here (a .pth file) instead of downloading
torch again; only `launcher` itself comes from the wheel."""
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from launcher import ROOT

# what the wheel is built from: pyproject.toml and the folders it maps into the package
PACKAGE_DIRS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
PACKAGED = ["pyproject.toml", *PACKAGE_DIRS.values()]
CONSOLE_SCRIPTS = ["torchrun", "accelerate", "deepspeed"]  # what the launcher starts beside its Python


def build_wheel(tmp: Path) -> Path:
    """From a copy of the sources: a build in the checkout would write build/ there, and reuse stale files from it."""
    src = tmp / "src"
    src.mkdir()
    for name in PACKAGED:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(src)], check=True, capture_output=True)
    return next((tmp / "dist").glob("launcher-*.whl"))


def make_venv(venv: Path) -> Path:
    """A fresh venv that sees this one's packages; pip and the console scripts come from here as well."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # a plain path: the .pth files over there (the checkout's editable `launcher` among them) are not read
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for name in CONSOLE_SCRIPTS:
        script = Path(sys.executable).parent / name
        if script.exists():  # as pip writes them: the same script, run by the new venv's Python
            body = script.read_text().split("\n", 1)[1]
            (venv / "bin" / name).write_text(f"#!{python}\n{body}")
            (venv / "bin" / name).chmod(0o755)
    return python


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the venv's python, a directory outside the checkout, the environment to run in)."""
    tmp = tmp_path_factory.mktemp("install")
    wheel = build_wheel(tmp)
    python = make_venv(tmp / "venv")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "LAUNCHER_PYTHON")}
    env["PATH"] = f"{python.parent}:{env['PATH']}"
    return python, elsewhere, env


def launcher(installed, *args, timeout=120, env=None):
    python, elsewhere, base_env = installed
    return subprocess.run([python, "-m", "launcher", *args], cwd=elsewhere, capture_output=True, text=True,
                          timeout=timeout, env={**base_env, **(env or {})})


def venv_of(installed) -> Path:
    return installed[0].parent.parent


def test_the_wheel_is_imported_with_its_folders_not_the_checkout(installed):
    python, elsewhere, env = installed
    res = subprocess.run([python, "-c", "import launcher; print(launcher.__file__)"], cwd=elsewhere,
                         capture_output=True, text=True, env=env)
    assert Path(res.stdout.strip()).is_relative_to(venv_of(installed)), res.stdout + res.stderr
    res = subprocess.run([python, "-m", "launcher.resources"], cwd=elsewhere, capture_output=True, text=True, env=env)
    folders = dict(line.split(": ", 1) for line in res.stdout.splitlines())
    assert sorted(folders) == ["accelerate_configs", "conf", "ds_configs", "slurm"], res.stdout + res.stderr
    for folder, path in folders.items():
        assert Path(path).is_relative_to(venv_of(installed)) and Path(path).name == folder
    assert (Path(folders["conf"]) / "model" / "tiny.yaml").is_file()
    assert (Path(folders["slurm"]) / "launch.sh").is_file()


def test_dry_runs_render_from_the_packaged_configs(installed, tmp_path):
    res = launcher(installed, "dry_run=true", f"run_dir={tmp_path}/run")
    assert res.returncode == 0, res.stderr
    assert "strategy:  ddp on cpu, backend torchrun" in res.stdout
    assert not (tmp_path / "run").exists()
    zero3 = launcher(installed, "strategy=zero3", "gpus=4", "dry_run=true", f"run_dir={tmp_path}/run")
    assert zero3.returncode == 0, zero3.stderr
    assert '"stage3_gather_16bit_weights_on_model_save": true' in zero3.stdout  # from ds_configs/zero3.json
    fsdp = launcher(installed, "strategy=fsdp_qlora", "quant=4bit", "gpus=2", "dry_run=true", f"run_dir={tmp_path}/r")
    assert fsdp.returncode == 0, fsdp.stderr
    assert "fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP" in fsdp.stdout  # from accelerate_configs/fsdp_qlora.yaml


def test_demo_data_is_the_packaged_copy(installed):
    res = launcher(installed, "--cfg", "job", "--resolve")
    assert res.returncode == 0, res.stderr
    data_path = Path(re.search(r"^  path: (.*demo_pref\.jsonl)$", res.stdout, re.M).group(1))
    assert data_path.is_relative_to(venv_of(installed)) and data_path.is_file()


def test_plan_picks_a_strategy(installed):
    res = launcher(installed, "plan", "gpu_mem_gib=24")
    assert res.returncode == 0, res.stderr
    assert "strategy=auto would take ddp: the fastest that fits" in res.stdout


def user_conf(tmp_path: Path) -> Path:
    """A user's own config folder with one model preset: the tiny model under another name."""
    tiny = (ROOT / "conf" / "model" / "tiny.yaml").read_text()
    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "my_conf" / "model" / "mine.yaml").write_text(re.sub(r"^name: tiny$", "name: mine", tiny, flags=re.M))
    return tmp_path / "my_conf"


def test_help_lists_groups_keys_and_a_user_config_dir(installed, tmp_path):
    mine = user_conf(tmp_path)
    res = launcher(installed, "--help", f"hydra.searchpath=[file://{mine}]")
    assert res.returncode == 0, res.stderr
    assert "strategy: auto, ddp, fsdp_qlora, zero2, zero3, zero3_offload  [auto]" in res.stdout
    assert re.search(r"^  model: .*\bmine\b.*, tiny, .*\[tiny\]$", res.stdout, re.M), res.stdout
    assert re.search(r"^  gpus=auto +GPUs per node", res.stdout, re.M), res.stdout
    assert "python -m launcher report <run_dir>" in res.stdout
    shipped_conf = re.search(r"^Config folders: (\S+) \(shipped\), (\S+) ", res.stdout, re.M)
    assert Path(shipped_conf.group(1)).is_relative_to(venv_of(installed)) and shipped_conf.group(2) == str(mine)


def test_a_model_preset_from_a_user_config_dir_is_planned(installed, tmp_path):
    mine = user_conf(tmp_path)
    res = launcher(installed, f"hydra.searchpath=[file://{mine}]", "model=mine", "dry_run=true")
    assert res.returncode == 0, res.stderr
    assert re.search(r"^run_dir: +\S+/runs/dpo-mine-\d", res.stdout, re.M), res.stdout  # run_name has model.name


def test_rendered_slurm_job_runs_the_packaged_launch_script(installed, tmp_path):
    res = launcher(installed, "cluster=slurm", "nodes=2", "gpus=8", "dry_run=true", f"run_dir={tmp_path}/job")
    assert res.returncode == 0, res.stderr
    launch = Path(re.search(r"^exec bash (\S+/launch\.sh) ", res.stdout, re.M).group(1))
    assert launch.is_relative_to(venv_of(installed)) and launch.is_file()


def fake_slurm(bin_dir: Path) -> dict:
    """srun runs its command here as node 0 and says what it runs; scontrol names one host. No daemons."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n'
                                  'echo "srun: $*"\nSLURM_NODEID=0 exec "$@"\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[ "$2" = hostnames ] && echo node0\nexit 0\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    return {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "dpo", "SLURM_JOB_NODELIST": "node0", "SLURM_NNODES": "1"}


def test_shipped_sbatch_script_starts_the_installed_launcher(installed, tmp_path):
    """The copy of dpo.sbatch Slurm runs finds launch.sh through the package; launch.sh runs its own venv's
    Python, also when that venv's bin is not on the PATH."""
    python, elsewhere, env = installed
    slurm_env = fake_slurm(tmp_path / "bin")
    sbatch = Path(subprocess.run([python, "-m", "launcher.resources", "slurm/dpo.sbatch"], cwd=elsewhere,
                                 capture_output=True, text=True, env=env, check=True).stdout.strip())
    assert sbatch.is_relative_to(venv_of(installed))
    job_copy = tmp_path / "slurm_script"  # as slurmd runs it: a copy, outside the package
    shutil.copy(sbatch, job_copy)
    res = subprocess.run(["bash", str(job_copy), "dry_run=true", f"run_dir={tmp_path}/run"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120,
                         env={**env, **slurm_env, "SLURM_SUBMIT_DIR": str(elsewhere),
                              "PATH": f"{tmp_path / 'bin'}:{env['PATH']}"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert f" {venv_of(installed)}/bin/python3 method=dpo data=demo_pref dry_run=true" in res.stdout, res.stdout
    assert "strategy:  ddp on cpu" in res.stdout
    without_venv = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != str(python.parent))
    launch = sbatch.parent / "launch.sh"
    res = subprocess.run(["bash", str(launch), "dry_run=true", f"run_dir={tmp_path}/run"], cwd=elsewhere,
                         capture_output=True, text=True, timeout=120,
                         env={**env, **slurm_env, "PATH": f"{tmp_path / 'bin'}:{without_venv}"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert f" {venv_of(installed)}/bin/python3 dry_run=true" in res.stdout, res.stdout


def test_embedded_default_trains_from_another_directory(installed, tmp_path):
    """`python -m launcher` as a new user runs it: builds the tiny model from the packaged assets (fresh cache),
    trains it on 2 CPU processes, writes the summary."""
    run = tmp_path / "run"
    res = launcher(installed, f"run_dir={run}", timeout=300, env={"LAUNCHER_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] > 0
    assert (tmp_path / "cache").is_dir() and (run / "final").is_dir()
