"""Checks that need the tokenizer, the data or a checkpoint, made once by the launcher in a child process
before it writes into the run directory or starts any rank: bad data or a checkpoint of another model
stops the launch with a message, and an existing run directory stays as it was.

    python -m launcher.preflight <config.yaml>      # exit 0: fine; 2: the message says what to change
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import yaml

from launcher import early_logs

if __name__ == "__main__":  # the launcher's child process: before the libraries, some of which warn on import
    early_logs.to_stderr_without_known_noise()

from launcher import checkpoints, data, modeling  # noqa: E402
from launcher.render import render_deepspeed_config  # noqa: E402
from launcher.strategies import resolve_strategy  # noqa: E402


def saved_adapter(ckpt: Path) -> dict | None:
    """The checkpoint's LoRA adapter settings (r, base model), or None when it holds no adapter.

    PEFT writes adapter_config.json into a LoRA run's checkpoints; where the Trainer writes FSDP shards only
    (fsdp_state_dict_type=SHARDED_STATE_DICT), the launcher's complete-marker callback does (launcher/checkpoints.py).
    """
    config = ckpt / "adapter_config.json"
    return json.loads(config.read_text()) if config.exists() else None


def checkpoint_mismatch(cfg: dict, ckpt: Path) -> str | None:
    """Why the checkpoint cannot be resumed with this config (another base model or adapter shape), or None."""
    saved = saved_adapter(ckpt)
    lora = cfg["lora"]
    if lora["r"] is None:
        return "it holds a LoRA adapter, and this config trains every weight (lora=none)" if saved else None
    if saved is None:
        return "it holds no LoRA adapter (a full fine-tune?), and this config trains one"
    if cfg["plan"]["strategy"] == "fsdp_qlora" and not checkpoints.adapter_tensor_count(ckpt):
        return ("its adapter_model.safetensors, which a resume under FSDP loads, is missing or holds no tensors "
                "(keep fsdp_state_dict_type=FULL_STATE_DICT; FSDP checkpoints of launcher versions before the "
                "PEFT 0.21 fix in launcher/modeling.py hold empty adapters and cannot be resumed)")
    differ = []
    if saved.get("r") != lora["r"]:
        differ.append(f"LoRA r={saved.get('r')} there, lora.r={lora['r']} here")
    base, here = saved.get("base_model_name_or_path"), cfg["plan"]["model_path"]
    if base and Path(base).name != Path(here).name:
        differ.append(f"base model {base} there, {here} here")
    return "; ".join(differ) or None


def deepspeed_settings_error(cfg: dict) -> str | None:
    """DeepSpeed's own check of the ZeRO settings given in strategy.deepspeed: a misspelt key or a bad value
    stops the launch here, not after the ranks have loaded the model."""
    if not (cfg["strategy"].get("deepspeed") or {}).get("zero_optimization"):
        return None
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    ds = render_deepspeed_config(resolve_strategy(cfg["plan"]["strategy"]), cfg["strategy"]["deepspeed"])
    zero = {k: v for k, v in ds["zero_optimization"].items() if v != "auto"}  # "auto" is filled in by transformers
    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as err:
        return "; ".join(f"strategy.deepspeed.zero_optimization.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                         for e in err.errors())
    return None


STALE_LOCK_S = 1800  # DeepSpeed builds an op in minutes: a build lock this old was left by a stopped run


def stale_build_lock_error(cfg: dict, root: Path | None = None, now: float | None = None) -> str | None:
    """A lock older than STALE_LOCK_S where torch builds the extensions DeepSpeed compiles at first use
    ($TORCH_EXTENSIONS_DIR/<op>/lock, else ~/.cache/torch_extensions/<python>_<device>/<op>/lock). torch's lock is a
    bare file: a run stopped while building leaves it, and every later build of that op waits on it forever (the
    ranks would hang before their first step)."""
    if not resolve_strategy(cfg["plan"]["strategy"]).deepspeed_template:
        return None
    given = os.environ.get("TORCH_EXTENSIONS_DIR")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = root or (Path(given) if given else cache / "torch_extensions")
    now = time.time() if now is None else now
    for lock in sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]):
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:  # a build that just ended removed it
            continue
        if age > STALE_LOCK_S:
            return (f"{lock} is {age / 60:.0f} min old: a run stopped while torch built DeepSpeed's "
                    f"{lock.parent.name} op left it, and this run's ranks would wait on it forever. If no build is "
                    f"running, delete it (rm {lock}) and launch again")
    return None


def token_budget_error(cfg: dict, report: data.DataReport) -> str | None:
    """A micro-batch holds whole pairs: a token budget under the data's longest pair could never hold that one."""
    budget = cfg["plan"].get("token_budget")
    if not budget or budget >= report.longest_tokens:
        return None
    return (f"micro_batch_tokens={budget} is smaller than row {report.longest_row} of data.path={cfg['data']['path']} "
            f"(its train split), whose pair takes {report.longest_tokens} tokens (chosen and rejected, each cut at "
            f"data.max_length={cfg['data']['max_length']}). Give micro_batch_tokens={report.longest_tokens} or more, "
            "or micro_batch_tokens=auto.")


def optimizer_error(cfg: dict) -> str | None:
    """train.optim as transformers knows it; a misspelt name would otherwise stop every rank after it starts."""
    from transformers.training_args import OptimizerNames

    names = [o.value for o in OptimizerNames]
    if cfg["plan"]["optim"] in names:
        return None
    return (f"train.optim={cfg['train']['optim']}: not an optimizer transformers knows. Give auto, or one of: "
            + ", ".join(names))


def scheduler_error(cfg: dict) -> str | None:
    """train.lr_scheduler as transformers knows it (a misspelt name stops every rank at its first step)."""
    from transformers.trainer_utils import SchedulerType

    names = [s.value for s in SchedulerType]
    wanted = cfg["train"]["lr_scheduler"]
    return None if wanted in names else (f"train.lr_scheduler={wanted}: not a scheduler transformers knows. Give "
                                         "one of: " + ", ".join(names))


def chat_template_error(tokenizer, cfg: dict) -> str | None:
    """model.chat_template that Jinja cannot parse, named before the ranks render rows with it."""
    if not cfg["model"].get("chat_template"):
        return None
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(tokenizer.chat_template)
    except TemplateSyntaxError as err:
        return f"model.chat_template: line {err.lineno} of the template: {err.message}"
    return None


def model_files_error(cfg: dict) -> str | None:
    """A local model folder's files that cannot be read (a download or copy broken off): else the ranks start, load
    for a while and fail in the loader without naming the file."""
    path = Path(str(cfg["plan"]["model_path"])).expanduser()
    if not path.is_dir() or not (why := checkpoints.unreadable(path, model=True)):
        return None
    return f"model.path={cfg['model']['path']}: {why}. Copy the model again from where it came from."


def lora_targets_error(cfg: dict) -> str | None:
    """Each name in lora.target_modules names layers of the model: PEFT adapts the names that match and says nothing
    of the others (a Llama list on Phi-3's fused qkv_proj would train o_proj alone). The model is built on the meta
    device from its config.json, no weights read; a hub id not on disk here is left to the ranks."""
    targets, path = cfg["lora"].get("target_modules"), Path(cfg["plan"]["model_path"]).expanduser()
    if cfg["lora"]["r"] is None or targets == "all-linear" or not (path / "config.json").is_file():
        return None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    trust = cfg["model"]["trust_remote_code"]
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    except Exception:  # noqa: BLE001 (a model transformers cannot build here: the ranks' loading says why)
        return None
    names = [name for name, _ in model.named_modules()]
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"} - {"lm_head"})
    advice = f"Its linear layers: {', '.join(linear)}. Give names from these, or lora.target_modules=all-linear."
    if isinstance(targets, str):  # PEFT takes a string as a regular expression over the whole module name
        if any(re.fullmatch(targets, n) for n in names):
            return None
        return (f"lora.target_modules={targets}: PEFT reads a single name as a regular expression over whole module "
                f"names (model.layers.0.self_attn.q_proj), and this one matches none of {path}. Give a list, e.g. "
                f"lora.target_modules=[{linear[0] if linear else 'q_proj'}]. {advice}")
    unmatched = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if not unmatched:
        return None
    return (f"lora.target_modules={targets}: {', '.join(unmatched)} name no layer of {path} ({config.model_type}), "
            f"so LoRA would leave {'it' if len(unmatched) == 1 else 'them'} out. {advice}")


def main(config_path: str) -> int:
    import datasets

    datasets.disable_progress_bars()
    cfg = yaml.safe_load(Path(config_path).read_text())
    try:
        tokenizer = modeling.load_tokenizer(cfg)
    except Exception as err:  # a hub id neither cached nor reachable, a folder without a tokenizer, a file cut short
        where = cfg["plan"]["tokenizer_path"]
        print(f"launcher: error: model.tokenizer: no tokenizer could be loaded from {where} "
              f"({str(err).strip().splitlines()[0][:200]}). Give a local model directory (model.path, or "
              "model.tokenizer for a tokenizer of its own), or a hub id this machine can download.", file=sys.stderr)
        return 2
    if why := chat_template_error(tokenizer, cfg):
        print(f"launcher: error: {why}", file=sys.stderr)
        return 2
    try:
        _, _, report = data.prepare(cfg["data"], cfg["method"]["name"], tokenizer, cfg["seed"])
    except data.DataError as err:
        print(f"launcher: error: data error: {err}", file=sys.stderr)
        return 2
    checks = (lambda: token_budget_error(cfg, report), lambda: model_files_error(cfg), lambda: lora_targets_error(cfg),
              lambda: scheduler_error(cfg), lambda: optimizer_error(cfg),
              lambda: (why := deepspeed_settings_error(cfg)) and (
                  f"{why}. DeepSpeed's names: https://www.deepspeed.ai/docs/config-json/"),
              lambda: stale_build_lock_error(cfg))
    for check in checks:  # in this order, the first that fails is said
        if why := check():
            print(f"launcher: error: {why}", file=sys.stderr)
            return 2
    resume = cfg["resume"]
    ckpt = checkpoints.find_resume(cfg["run_dir"], resume) if resume else None
    if ckpt and resume != "auto" and (why := checkpoints.unreadable(Path(ckpt))):  # (auto skips such a one)
        print(f"launcher: error: resume: checkpoint {ckpt}: {why}. Give resume= an earlier checkpoint, or "
              "resume=auto to take the newest readable one.", file=sys.stderr)
        return 2
    if ckpt and (why := checkpoint_mismatch(cfg, Path(ckpt))):
        print(f"launcher: error: resume: checkpoint {ckpt} does not fit this config: {why}. Use a matching "
              "config, another run_dir, or resume=null to start over.", file=sys.stderr)
        return 2
    finished = Path(cfg["run_dir"], "summary.json").is_file()  # (else its final adapter may not be written yet)
    if ckpt and finished and (why := checkpoints.nothing_left(ckpt, cfg["train"]["max_steps"])):
        print(f"launcher: resume: {why}", flush=True)
        return checkpoints.EXIT_NOTHING_LEFT
    print(f"launcher: {report.line(cfg['data']['max_length'])}", flush=True)
    return 0


if __name__ == "__main__":
    try:
        code = main(sys.argv[1])
    except KeyboardInterrupt:  # Ctrl-C reaches the launcher too, which says so
        code = 130
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the interpreter's teardown of torch and datasets takes 2-3 s that the launch would wait for
