"""Loading the tokenizer and the model the way the plan says, the LoRA config, and merging.

Every placement decision comes from the plan (launcher/strategies.py); this module only carries
them out and logs what it did.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from launcher import padding_free, validate

log = logging.getLogger("launcher")


def load_tokenizer(cfg: dict):
    from transformers import AutoTokenizer

    plan, model_cfg = cfg["plan"], cfg["model"]
    tok = AutoTokenizer.from_pretrained(plan["tokenizer_path"], trust_remote_code=model_cfg["trust_remote_code"])
    template = model_cfg.get("chat_template")
    if template:
        path = Path(template).expanduser()
        tok.chat_template = path.read_text() if path.is_file() else template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # batching needs one; the eos token is the usual stand-in
    return tok


def quantization_config(cfg: dict):
    from transformers import BitsAndBytesConfig

    bits, plan = cfg["quant"]["bits"], cfg["plan"]
    if not bits:
        return None
    dtype = getattr(torch, plan["dtype"])
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg["quant"]["quant_type"],
        bnb_4bit_use_double_quant=cfg["quant"]["double_quant"],
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=getattr(torch, plan["quant_storage_dtype"]),
    )


def load_model(cfg: dict, local_rank: int):
    from transformers import AutoModelForCausalLM

    plan, model_cfg = cfg["plan"], cfg["model"]
    attention = plan.get("attn_implementation") or model_cfg["attn_implementation"]
    if attention == padding_free.VARLEN_ATTENTION:
        padding_free.register_varlen_attention()
    kwargs = dict(dtype=getattr(torch, plan["dtype"]), trust_remote_code=model_cfg["trust_remote_code"],
                  attn_implementation=attention)
    quant = quantization_config(cfg)
    if quant is not None and not validate.prequantized(plan["model_path"]):  # else its own, as it was saved
        kwargs["quantization_config"] = quant
    if plan["device_map"] == "local_rank":
        kwargs["device_map"] = {"": local_rank}
    log.debug("loading %s: dtype=%s quant=%s device_map=%s", plan["model_path"], plan["dtype"],
             cfg["quant"]["name"], kwargs.get("device_map"))
    model = AutoModelForCausalLM.from_pretrained(plan["model_path"], **kwargs)
    model.config.use_cache = False  # the cache only matters for generation, and it breaks checkpointing
    if quant is not None and plan["kbit_prepare"]:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=plan["gradient_checkpointing"],
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return model


def private_memory_gib() -> float | None:
    """This process's own memory (RssAnon): not the checkpoint pages it maps, which are the page cache's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return round(int(line.split()[1]) / 2**20, 1)  # kB
    except OSError:
        pass
    return None


def load_model_timed(cfg: dict, local_rank: int):
    """load_model, and what it took: {"load_seconds", "host_private_gib_after_load"}."""
    started = time.perf_counter()
    model = load_model(cfg, local_rank)
    took = {"load_seconds": round(time.perf_counter() - started, 1), "host_private_gib_after_load": private_memory_gib()}
    log.debug("loaded in %.1f s; this process's own host memory %s GiB", took["load_seconds"],
             took["host_private_gib_after_load"])
    return model, took


def lora_config(cfg: dict):
    from peft import LoraConfig

    lora = cfg["lora"]
    if lora["r"] is None:
        return None
    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=lora["target_modules"], task_type="CAUSAL_LM")


def merge_adapter(cfg: dict, adapter_dir: str, out_dir: str) -> None:
    """Merge into the unquantized base in 16-bit (merging into 4-bit weights would round the adapter away)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # Only rank 0 merges. Under ZeRO-3 the run's DeepSpeed config is still registered in transformers, and
    # from_pretrained would then build the base in zero.Init, which waits for the other ranks: a hang.
    unset_hf_deepspeed_config()
    plan = cfg["plan"]
    dtype = torch.float32 if plan["device"] == "cpu" else torch.bfloat16 if plan["dtype"] == "bfloat16" else torch.float16
    base = AutoModelForCausalLM.from_pretrained(plan["model_path"], dtype=dtype,
                                                trust_remote_code=cfg["model"]["trust_remote_code"])
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(out_dir)
    log.info("merged adapter into %s (%s)", out_dir, str(dtype).removeprefix("torch."))


def cast_trainable(model, dtype_name: str | None) -> None:
    """FSDP and ZeRO flatten parameters into buffers of one dtype: bring the adapter to the base's dtype."""
    if not dtype_name:
        return
    dtype = getattr(torch, dtype_name)
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


def feed_adapters_the_activations_as_they_are(model) -> int:
    """Under DDP, PEFT keeps LoRA weights in float32 and, before each adapter, copies its bf16 input to float32;
    autocast then copies it back to bf16 for the matmul and keeps that copy for the backward. The matmul sees the
    same bf16 values either way, so the two copies per adapter only cost time and memory: turn PEFT's cast off
    (its own `cast_input_dtype_enabled` switch). Returns the number of adapter layers changed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)


def add_adapter_outputs_inside_the_matmul(model, dropout_kernel: bool = False, one_node: bool = False) -> int:
    """PEFT computes each LoRA layer as `result + lora_B(lora_A(dropout(x))) * scaling`: the scaling and the sum
    are two passes over the layer's whole output, and the scaling's backward a third. One GEMM does both:
    result.addmm_(lora_A(dropout(x)), lora_B.weight.T, alpha=scaling), accumulating into the base output in place.
    The weights are read directly, so this is only for strategies where they are whole at forward (DDP, ZeRO-2:
    ZeRO-3 and FSDP gather them in module hooks). Any case it does not cover (adapter disabled, as in DPO's
    reference pass; merged; several adapters; LoRA variants; a bias on lora_B) runs PEFT's own forward.
    dropout_kernel: where LoRA's dropout is on (training, p > 0) and x is a 16-bit CUDA tensor, lora_A(dropout(x))
    runs as one Triton kernel that keeps a bit per element, not a dropped copy and a byte mask
    (launcher/lora_dropout_kernel.py).
    one_node: where the dropout runs in the kernel or nothing drops, x is a 16-bit CUDA tensor and the base is a
    plain frozen nn.Linear, base and adapter run as one autograd node (launcher/lora_layer.py): x's gradient is then
    made as one tensor, not two that autograd adds.
    Returns the number of layers changed."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    kernel = None
    if dropout_kernel or one_node:
        from launcher import lora_dropout_kernel as kernel, lora_layer

    def forward(self, x, *args, **kwargs):
        names = self.active_adapters
        if (args or kwargs or self.disable_adapters or self.merged or len(names) != 1 or names[0] not in self.lora_A
                or names[0] in self.lora_variant or self.lora_B[names[0]].bias is not None):
            return LoraLinear.forward(self, x, *args, **kwargs)
        name = names[0]
        # Rows in, so that the base layer's output is a tensor of its own, not a view: the adapter's product is
        # then added into it in place (addmm_), where out-of-place addmm first copies the whole output
        rows = x.reshape(-1, x.shape[-1])
        lora_a, lora_b, scaling = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        dropout = self.lora_dropout[name]
        p = getattr(dropout, "p", 0) if dropout.training else 0
        fits = (kernel and kernel.fits(rows, self.r[name])
                and (x.dtype == lora_a.dtype or not getattr(self, "cast_input_dtype_enabled", True)))
        in_kernel = fits and dropout_kernel and p > 0
        if one_node and (in_kernel or (fits and p == 0)) and lora_layer.takes(self.base_layer, rows, lora_a, lora_b):
            out = lora_layer.FrozenLinearWithLora.apply(rows, self.base_layer.weight, self.base_layer.bias, lora_a,
                                                        lora_b, scaling, p, kernel.draw_seed() if p else 0)
            return out.view(*x.shape[:-1], out.shape[-1])
        result = self.base_layer(rows)
        if in_kernel:
            down = kernel.dropout_then_down(rows, lora_a, p)
        else:
            down = self.lora_A[name](dropout(self._cast_input_dtype(rows, lora_a.dtype)))
        up = lora_b.t()
        if torch.is_autocast_enabled(result.device.type):  # what autocast would do for addmm: all in its dtype
            down, up = down.to(result.dtype), up.to(result.dtype)
        if not result.dtype == down.dtype == up.dtype:  # mixed dtypes: PEFT's sum promotes them
            out = result + self.lora_B[name](down) * scaling
        elif result._base is not None:  # a view (a base layer that reshapes its output): in place would copy it back
            out = torch.addmm(result, down, up, alpha=scaling)
        else:
            out = result.addmm_(down, up, alpha=scaling)
        return out.view(*x.shape[:-1], out.shape[-1])

    layers = [m for m in model.modules() if type(m) is LoraLinear]
    for layer in layers:
        layer.forward = forward.__get__(layer)
    log.debug("LoRA sums in the lora_B matmul: %d layers", len(layers))
    return len(layers)


def fetch_whole_layers_under_zero3(model) -> list[str]:
    """Mark each decoder layer (the classes transformers lists in `_no_split_modules`) a DeepSpeed ZeRO-3 leaf
    module: ZeRO-3 then gathers a layer's weights, LoRA's included, in one fetch and hooks the layer alone,
    instead of hooking each of its ~40 sub-modules. It also keeps the module order the same in DPO's reference
    pass, which runs with the adapter disabled and so skips every lora_A/lora_B: per module, that order change
    makes ZeRO-3 drop its prefetch trace twice a step. Returns the names of the classes it marked.

    ZeRO-3 reduces a leaf module's gradients in the module's full backward hook. Where no input of the module
    needs a gradient, as for the first layer over frozen embeddings, that hook fires as the layer's backward
    starts, before its weights' gradients exist: DeepSpeed 0.19.8 then reduces zeros, the first layer's adapter
    does not train (DPO) or the late gradient meets a released weight ("size of tensor a (0) must match ... (16)",
    SFT). So the embeddings' output is made to require a gradient: one more input gradient, for the first layer."""
    from deepspeed.utils import set_z3_leaf_modules

    marked = set_z3_leaf_modules(model, list(model._no_split_modules or []), raise_if_not_found=False)
    if marked:
        model.enable_input_require_grads()
    classes = sorted({type(m).__name__ for m in marked})
    log.debug("ZeRO-3 fetches whole layers: %d %s modules", len(marked), "/".join(classes) or "(none found)")
    return classes


def find_adapter_weights_under_fsdp1() -> None:
    """Make PEFT see the adapter of a model that FSDP1 has wrapped layer by layer.

    PEFT 0.21 picks the adapter's entries out of a state dict by the names of its LoRA modules and strips only a
    leading "_fsdp_wrapped_module." from them; FSDP1's auto-wrap puts one inside every wrapped layer's name
    ("layers.0._fsdp_wrapped_module.self_attn..."), while the state dict FSDP returns has none. Nothing matched, so
    every adapter the Trainer saved under FSDP (checkpoints, final/) held 0 tensors: measured on the GPU machine,
    reproduced on the CPU in tests/test_modeling.py. This drops the wrapper's name from every place in the names.
    """
    from peft.tuners import tuners_utils

    find = tuners_utils._get_tuner_state_dict_key_prefixes
    if getattr(find, "sees_fsdp1", False):
        return

    def prefixes(model, adapter_name=None):
        return {p.replace("_fsdp_wrapped_module.", "") for p in find(model, adapter_name)}

    prefixes.sees_fsdp1 = True
    tuners_utils._get_tuner_state_dict_key_prefixes = prefixes


def keep_adapters_in_layer_units() -> None:
    """strategy.adapters_in_layer_units: FSDP wraps decoder layers only, as accelerate.yaml says, with each
    layer's LoRA matrices inside its unit. transformers 5.17 swaps in PEFT's wrap policy (a unit per LoRA matrix,
    which use_orig_params=false needs) when train() prepares a PEFT model; this keeps the rest of what it does
    there (the 4-bit storage dtype as FSDP's mixed precision) and puts accelerate's policy back."""
    import transformers.trainer as trainer_module

    update = trainer_module.update_fsdp_plugin_peft
    if getattr(update, "keeps_layer_units", False):
        return

    def update_but_keep_the_wrap_policy(model, accelerator):
        policy = accelerator.state.fsdp_plugin.auto_wrap_policy
        update(model, accelerator)
        accelerator.state.fsdp_plugin.auto_wrap_policy = policy

    update_but_keep_the_wrap_policy.keeps_layer_units = True
    trainer_module.update_fsdp_plugin_peft = update_but_keep_the_wrap_policy


def restore_adapter(model, ckpt: str) -> None:
    """Load a checkpoint's adapter_model.safetensors into the (not yet wrapped) PeftModel.

    The Trainer's own FSDP reload (pytorch_model_fsdp.bin into the wrapped model) was only ever seen on the
    GPU machine with the empty files of find_adapter_weights_under_fsdp1's bug; the file PEFT writes beside it
    is the one proven to resume exactly (docs/gpu-runs.md: the same held-out loss to 4 decimals), so it is
    loaded here, before FSDP wraps the model.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(ckpt, "adapter_model.safetensors")
    state = load_file(str(path)) if path.exists() else {}
    if not state:
        raise FileNotFoundError(f"{path}: missing or empty; an FSDP checkpoint of a LoRA run must hold the adapter "
                                "to resume from (those written before find_adapter_weights_under_fsdp1 hold none)")
    result = set_peft_model_state_dict(model, state)
    if result.unexpected_keys:
        raise ValueError(f"{path} does not fit this adapter: {result.unexpected_keys[:3]}")
    log.info("adapter restored from %s (%d tensors)", path, len(state))


def compile_layers_in_place(model) -> None:
    """train.compile: accelerate's regional compilation, in place. Each decoder layer (and each other leaf module)
    gets `module.compile()`; the layers share one class, so the first one's graph serves them all. accelerate's
    default `compile_regions` returns a copy of the model instead, whose patched forwards (padding-free batches,
    launcher/padding_free.py) still call the uncompiled original: measured as 0 graphs on an H200."""
    from accelerate.utils import compile_regions_deepspeed  # in place; named for DeepSpeed, which needs it so too

    compile_regions_deepspeed(model)
