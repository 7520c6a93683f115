"""A random-weight checkpoint of any size, written one decoder layer at a time: a model of a preset's shape
to measure with when its real weights cannot be downloaded (no hub on the GPU machines) or stored (a 70B model
is 141 GB in bf16; the x2 machine's disk holds 128 GiB).

`quant="4bit"` writes it pre-quantized to bitsandbytes NF4 (double-quantized, blocksize 64), laid out exactly as
`save_pretrained` lays out a model loaded with `BitsAndBytesConfig(load_in_4bit=True)`: the packed weight and its
quantization state under `<linear>.weight.*`, `quantization_config` in config.json. `from_pretrained` then
loads it through transformers' own pre-quantized path, as it loads users' pre-quantized checkpoints: each rank
reads the 4-bit tensors and moves them to its GPU, and no process ever holds the bf16 model (about 40 GB for
Llama-3.1-70B; loading it needs a shard of host memory, not the model).

Weights are N(0, initializer_range), norms one, biases zero; each tensor is drawn from a generator seeded by its
name, so it does not depend on the sharding (CPU and GPU generators draw differently).

    python -m launcher.random_checkpoint OUT_DIR PRESET [--quant none|4bit] [--storage bfloat16|uint8]
"""
from __future__ import annotations

import argparse
import json
import resource
import time
import zlib
from pathlib import Path

import torch
import yaml

from launcher.resources import shipped


def model_config(shape: dict, **extra):
    """A transformers config from a preset's `shape` (its model_type, qwen2 where none is given)."""
    from transformers import AutoConfig

    shape = dict(shape)
    kind = shape.pop("model_type", "qwen2")
    defaults = {"max_position_embeddings": 4096, "rope_theta": 1e6} if kind == "qwen2" else {}
    return AutoConfig.for_model(kind, **{**defaults, **shape, **extra})


def bnb_config(storage: str):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=getattr(torch, storage))


def _groups(names: list[str]) -> list[list[str]]:
    """State-dict names in shards: the embedding, one decoder layer each, then the rest (norm, lm_head)."""
    first, layers, last = [], {}, []
    for name in names:
        parts = name.split(".")
        if "layers" in parts:
            layers.setdefault(int(parts[parts.index("layers") + 1]), []).append(name)
        elif "embed_tokens" in name:
            first.append(name)
        else:
            last.append(name)
    return [g for g in (first, *(layers[i] for i in sorted(layers)), last) if g]


def write(config, out_dir: str | Path, quant: str = "none", storage: str = "bfloat16", seed: int = 0,
          device: str | None = None) -> dict:
    """Writes the checkpoint; returns what it took (bytes, seconds, this process's peak host memory)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    started, out = time.perf_counter(), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with torch.device("meta"):  # the names and shapes, no memory
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = {n: t.shape for n, t in skeleton.state_dict().items()}
    # what bitsandbytes quantizes: the Linear layers, not the output embedding
    output = skeleton.get_output_embeddings()
    linear = {f"{n}.weight" for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear) and m is not output}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)  # transformers ties it to the embedding again
    groups = _groups(list(shapes))
    weight_map, total = {}, 0
    for number, names in enumerate(groups, 1):
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
                continue
            if name.endswith(".bias"):
                tensors[name] = torch.zeros(shapes[name], dtype=torch.bfloat16)
                continue
            gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            weight = torch.empty(shapes[name], dtype=torch.bfloat16, device=device)
            weight.normal_(0.0, config.initializer_range, generator=gen)
            if quant == "4bit" and name in linear:
                tensors.update(_quantized(name, weight, storage))
            else:
                tensors[name] = weight.cpu()
            del weight
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, out / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    config.architectures = [type(skeleton).__name__]
    config.dtype = torch.bfloat16
    if quant == "4bit":
        config.quantization_config = bnb_config(storage).to_dict()
    config.save_pretrained(out)
    return {"bytes": total, "seconds": round(time.perf_counter() - started, 1),
            "host_peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def _quantized(name: str, weight: torch.Tensor, storage: str) -> dict:
    """One linear weight as bitsandbytes' Linear4bit saves it: the packed weight and its quantization state."""
    from bitsandbytes.functional import quantize_4bit

    packed, state = quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4",
                                  quant_storage=getattr(torch, storage))
    out = {name: packed.cpu()}
    for key, value in state.as_dict(packed=True).items():  # absmax, quant_map, nested_*, quant_state.*
        out[f"{name}.{key}"] = value.detach().cpu().clone()  # clone: safetensors refuses shared storage
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launcher.random_checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("preset", help="a conf/model preset with a `shape` (e.g. llama-3.1-70b-instruct)")
    p.add_argument("--quant", choices=["none", "4bit"], default="none")
    p.add_argument("--storage", choices=["bfloat16", "uint8"], default="bfloat16",
                   help="4-bit storage dtype: bfloat16 for FSDP and ZeRO-3 (they shard it), uint8 otherwise")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    preset = shipped("conf") / "model" / f"{args.preset}.yaml"
    if not preset.is_file():
        p.error(f"preset {args.preset}: no {preset}")
    config = model_config(yaml.safe_load(preset.read_text())["shape"])
    took = write(config, args.out_dir, args.quant, args.storage, args.seed)
    print(f"wrote {args.out_dir}: {took['bytes'] / 2**30:.1f} GiB in {took['seconds']} s, host memory peak "
          f"{took['host_peak_gib']} GiB", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
