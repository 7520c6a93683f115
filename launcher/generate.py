"""`python -m launcher generate <run_dir> "prompt" [...]`: a quick look at what a run's model answers.

Greedy answers from the tuned model, through the tokenizer's chat template, on a GPU or the CPU. The tuned model
is <run_dir>/merged where the run merged, else the base from config.yaml with the adapter (or the full weights)
in <run_dir>/final, else the newest complete checkpoint (a run still going, or one that failed). `--base` answers
with the base model too: with an adapter, the same model with the adapter disabled; otherwise a second load.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher import samples


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launcher generate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("prompts", nargs="+", metavar="prompt", help="asked as one user turn each")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--base", action="store_true", help="also answer with the base model")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda where there is one")
    return parser.parse_args(argv)


def tuned_weights(run_dir: Path) -> tuple[str, Path]:
    """("merged" | "adapter" | "full", the folder): where the run's tuned weights are."""
    from launcher.checkpoints import find_resume

    if (run_dir / "merged" / "config.json").exists():
        return "merged", run_dir / "merged"
    candidates = [run_dir / "final"]
    if newest := find_resume(str(run_dir), "auto"):
        candidates.append(Path(newest))
    for folder in candidates:
        if (folder / "adapter_config.json").exists():
            return "adapter", folder
        if (folder / "config.json").exists():
            return "full", folder
    raise FileNotFoundError(f"{run_dir}: no tuned weights (no merged/, final/ or complete checkpoint holds a model "
                            "or an adapter); the run has not saved any yet")


def load_model(cfg: dict, path: str, device: str, quantize: bool):
    """A causal LM for generation: the run's dtype on a GPU (and its quantization, for a base the adapter goes on);
    float32 on the CPU where the run trained in it, else bfloat16 (the CPU has no bitsandbytes)."""
    import torch
    from transformers import AutoModelForCausalLM

    from launcher import modeling, validate

    plan = cfg["plan"]
    dtype = plan["dtype"] if device == "cuda" or plan["dtype"] == "float32" else "bfloat16"
    kwargs = dict(dtype=getattr(torch, dtype), trust_remote_code=cfg["model"]["trust_remote_code"],
                  device_map={"": 0} if device == "cuda" else None,
                  attn_implementation=cfg["model"]["attn_implementation"] if device == "cuda" else "sdpa")
    if quantize and device == "cuda" and cfg["quant"]["bits"] and not validate.prequantized(path):
        kwargs["quantization_config"] = modeling.quantization_config(cfg)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.to(device) if device == "cpu" else model


def answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The prompts in one batch, as at the end of training (the same prompts give the same answers)."""
    ids = [samples.prompt_ids(tokenizer, p)[0] for p in prompts]
    with samples.generating(model):
        return samples.answers(model, tokenizer, ids, max_new_tokens)


def generate(run_dir: Path, prompts: list[str], max_new_tokens: int, base: bool, device: str) -> list[dict]:
    """[{"prompt", "tuned", "base" (with base=True)}] for each prompt."""
    import yaml

    from launcher import modeling

    config = run_dir / "config.yaml"
    if not config.exists():
        raise FileNotFoundError(f"{config}: missing; not a launcher run directory")
    cfg = yaml.safe_load(config.read_text())
    kind, folder = tuned_weights(run_dir)
    base_path = cfg["plan"]["model_path"]
    # The run's own tokenizer, as training loaded it: one saved beside a model's config.json (full weights, merged/)
    # loads in transformers 5 as the model type's class, which can split text differently (the tiny model: digits)
    tokenizer = modeling.load_tokenizer(cfg)
    print(f"launcher: tuned model: {folder} ({kind}), on {device}", file=sys.stderr, flush=True)
    if kind == "adapter":
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_model(cfg, base_path, device, quantize=True), str(folder))
    else:
        model = load_model(cfg, str(folder), device, quantize=False)
    results = [{"prompt": p, "tuned": a} for p, a in zip(prompts, answers(model, tokenizer, prompts, max_new_tokens))]
    if base:
        if kind == "adapter":
            with model.disable_adapter():
                base_answers = answers(model, tokenizer, prompts, max_new_tokens)
        else:
            del model  # the tuned weights go before the base comes
            base_answers = answers(load_model(cfg, base_path, device, quantize=True), tokenizer, prompts,
                                   max_new_tokens)
        for result, text in zip(results, base_answers):
            result["base"] = text
    return results


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # the answers are the output
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("launcher: error: --device cuda: no CUDA GPU visible; use --device cpu", file=sys.stderr)
        return 2
    try:
        results = generate(Path(args.run_dir), args.prompts, args.max_new_tokens, args.base, device)
    except FileNotFoundError as err:
        print(f"launcher: error: {err}", file=sys.stderr)
        return 2
    for result in results:
        print(f"=== prompt: {result['prompt']}\n--- tuned:\n{result['tuned']}")
        if "base" in result:
            print(f"--- base:\n{result['base']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
