"""A model's dimensions, as the memory plan and FP8's sizing read them: from its config.json (its folder, or the hub's
cache for a hub id downloaded before), else from the preset's `shape`. No torch, no transformers: the planner runs
without them."""
from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from pathlib import Path

# config.json's names for a model's dimensions, transformers' usual one first (GPT-2, Falcon and T5-style configs
# name them otherwise)
CONFIG_NAMES = {"hidden_size": ("hidden_size", "n_embd", "d_model"),
                "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
                "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
                "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim"),
                "num_key_value_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv"),
                "vocab_size": ("vocab_size",)}


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int | None = None  # where the config gives one (Gemma's 256 at hidden 2304); else hidden // heads

    @classmethod
    def from_config(cls, c: dict, where: str = "the model's config") -> "Shape":
        """From a config.json's dict (a multimodal model's text_config where the language model's dimensions are),
        or a preset's shape. ValueError names what is missing."""
        if not any(name in c for name in CONFIG_NAMES["hidden_size"]) and isinstance(c.get("text_config"), dict):
            c = c["text_config"]

        def given(key):
            return next((c[name] for name in CONFIG_NAMES[key] if c.get(name) is not None), None)

        missing = [key for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
                   if given(key) is None]
        others = [n for key in missing for n in CONFIG_NAMES[key][1:]]
        if missing:
            nor = f" (nor {', '.join(others)})" if others else ""
            raise ValueError(f"{where} gives no {', '.join(missing)}{nor}")
        wrong = [key for key in CONFIG_NAMES if given(key) is not None
                 and (isinstance(given(key), bool) or not isinstance(given(key), int))]
        if wrong:  # a list per layer, say: the plan's arithmetic takes one size
            raise ValueError(f"{where}: {', '.join(f'{k}={given(k)!r}' for k in wrong)} is not one whole number")
        hidden, heads = given("hidden_size"), given("num_attention_heads")
        return cls(hidden, given("intermediate_size") or 4 * hidden,  # GPT-2's n_inner null: 4 x hidden
                   given("num_hidden_layers"), heads,
                   given("num_key_value_heads") or (1 if c.get("multi_query") else heads),  # Falcon-7B: one
                   given("vocab_size"),
                   bool(c.get("tie_word_embeddings", False)), c.get("head_dim"))

    @property
    def attention_dim(self) -> int:
        """Width of the query heads together (o_proj's input): hidden, unless the config sets head_dim."""
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    def linear_params(self) -> int:
        """Weights of the layers' linear projections (what bitsandbytes quantizes)."""
        return self.fp8_params(0)

    def other_params(self) -> int:
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return embed + self.layers * 2 * self.hidden + self.hidden

    def total_params(self) -> int:
        return self.linear_params() + self.other_params()

    def projections(self) -> dict[str, tuple[int, int]]:
        h, i, kv, q = self.hidden, self.intermediate, self.kv_dim, self.attention_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def lora_params(self, r: int, targets) -> int:
        shapes = self.projections()
        names = shapes if targets == "all-linear" else [t for t in targets if t in shapes]
        return self.layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in names)

    def fp8_params(self, min_features: int) -> int:
        """Weights of the projections at least min_features wide (those FP8 computes with, launcher/fp8_linear.py)."""
        return self.layers * sum(a * b for a, b in self.projections().values() if min(a, b) >= min_features)


def model_config(model_cfg: dict) -> dict | None:
    """The model's config.json: in its folder, or in the hub's cache for a hub id downloaded before (no network);
    None where neither has it. ValueError where the file is no JSON."""
    path = Path(str(model_cfg["path"])).expanduser() / "config.json"
    if not path.is_file() and str(model_cfg["path"]).count("/") == 1 and not str(model_cfg["path"]).startswith("."):
        from huggingface_hub import try_to_load_from_cache  # a hub id, "org/name"

        try:
            cached = try_to_load_from_cache(str(model_cfg["path"]), "config.json")
        except ValueError:  # not a name the hub takes (HFValidationError): no cached file either
            cached = None
        path = Path(cached) if isinstance(cached, str) else path
    if not path.is_file():
        return None
    stat = path.stat()
    return copy.deepcopy(_read_json(str(path), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=32)
def _read_json(path: str, mtime_ns: int, size: int) -> dict:
    """A config.json read once per version of the file: the memory plan asks for it at every micro-batch it tries."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON ({err})") from None


def attention_softcap(model_cfg: dict) -> float | None:
    """Gemma 2's tanh cap on the attention logits (config.json's attn_logit_softcapping), or None."""
    try:
        config = model_config(model_cfg) or model_cfg.get("shape") or {}
    except ValueError:  # the memory plan names the file where it needs it
        return None
    config = config.get("text_config", config) if "attn_logit_softcapping" not in config else config
    return config.get("attn_logit_softcapping") if isinstance(config, dict) else None


def model_shape(model_cfg: dict) -> Shape:
    """The model's own config.json when it is on disk, else the preset's `shape`."""
    if (config := model_config(model_cfg)) is not None:
        return Shape.from_config(config, f"the config.json of model.path={model_cfg['path']}")
    if model_cfg.get("shape"):
        return Shape.from_config(model_cfg["shape"], f"model.shape of the preset {model_cfg.get('name')}")
    raise ValueError(f"model.path={model_cfg['path']}: no config.json here and no model.shape in the preset")
