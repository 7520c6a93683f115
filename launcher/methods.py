"""The training methods, and the one module that knows where TRL keeps each: DPO, KTO, ORPO, SimPO and SFT.

TRL 1.16 (pinned): DPOTrainer, KTOTrainer and SFTTrainer are stable; ORPO and CPO live in trl.experimental, and
SimPO is CPO's loss_type="simpo" with cpo_alpha=0 (no NLL term). A TRL change touches this module only.

Pure until `training_config` / `build_trainer`, which import TRL (the launcher itself never does).
"""
from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

from launcher.errors import ConfigError


@dataclass(frozen=True)
class Method:
    name: str
    rows: str  # what it learns from: "pairs" (prompt/chosen/rejected), "labelled" (prompt/completion/label), "sft"
    sequences_per_row: int  # sequences run with gradients per row: a pair's two, one otherwise
    reference: bool  # a reference model's forward at each step (the adapter-disabled base with LoRA, else a copy)
    keeps_empty_answers: bool  # its trainer keeps a row whose prompt fills max_length (its answer: empty, a NaN loss)
    summary: str  # the held-out result the console, summary and report lead with


METHODS = {
    "dpo": Method("dpo", "pairs", 2, True, False, "reward accuracy"),
    # KTO also runs a KL pass per step (mismatched prompt/completion pairs) without gradients, policy and reference
    "kto": Method("kto", "labelled", 1, True, False, "reward gap"),
    # ORPO and CPO keep a row whose prompt fills max_length with an empty answer (a 0/0 average log-prob: NaN), where
    # the others drop it: launcher/data.py drops those rows for them
    "orpo": Method("orpo", "pairs", 2, False, True, "reward accuracy"),
    "simpo": Method("simpo", "pairs", 2, False, True, "reward accuracy"),
    "sft": Method("sft", "sft", 1, False, False, "loss"),
}

# TRL 1.16's DPOConfig.loss_type values (trl/trainer/dpo_config.py); TRL itself checks them only at the first step
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
NEEDS_SMOOTHING = ("exo_pair",)  # TRL raises at the first step with label_smoothing=0


def method_of(cfg: dict) -> Method:
    name = cfg["method"]["name"]
    if name not in METHODS:
        raise ConfigError("method", f"method={name}: not a method the launcher knows; give one of "
                                    f"{', '.join(METHODS)}.")
    return METHODS[name]


def loss_types(method_cfg: dict) -> list[str]:
    value = method_cfg.get("loss_type", "sigmoid")
    return [value] if isinstance(value, str) else list(value)


def check(cfg: dict) -> None:
    """The method's own settings, before anything starts (TRL would find most of these at the first step)."""
    method, m = method_of(cfg), cfg["method"]
    if method.name == "dpo":
        types = loss_types(m)
        unknown = [t for t in types if t not in DPO_LOSS_TYPES]
        if unknown or not types:
            raise ConfigError("method.loss_type", f"method.loss_type={m['loss_type']}: {', '.join(unknown) or 'empty'}"
                                                  f" is not a DPO loss of TRL 1.16; give one or a list of "
                                                  f"{', '.join(DPO_LOSS_TYPES)}.")
        if any(t in NEEDS_SMOOTHING for t in types) and not m.get("label_smoothing"):
            raise ConfigError("method.label_smoothing", "method.loss_type=exo_pair needs method.label_smoothing>0 "
                                                        "(TRL suggests 1e-3).")
    if method.name == "kto":
        if m.get("loss_type", "kto") not in KTO_LOSS_TYPES:
            raise ConfigError("method.loss_type", f"method.loss_type={m['loss_type']}: KTO's losses in TRL 1.16 are "
                                                  f"{', '.join(KTO_LOSS_TYPES)}.")
        if cfg["micro_batch"] == 1 and m.get("loss_type", "kto") == "kto":
            raise ConfigError("micro_batch", "micro_batch=1 (given, or all that micro_batch=auto fits) with method=kto:"
                                             " KTO's KL term is taken over the other rows of a micro-batch, so it needs"
                                             " at least 2 (with less memory per row: a shorter data.max_length, or "
                                             "method.loss_type=apo_zero_unpaired, which has no KL term).")
    if m.get("precompute_ref_log_probs") is True and not method.reference:
        raise ConfigError("method.precompute_ref_log_probs", f"method={method.name} has no reference model to "
                                                             "precompute: drop method.precompute_ref_log_probs.")


# Where TRL 1.16's precompute was run (2 CPU processes in tests/test_train.py; one H200 in docs/benchmarks.md).
# Under fsdp_qlora TRL runs the whole unsharded policy on every GPU before FSDP wraps it: at the sizes fsdp_qlora is
# chosen for, that does not fit. Under ZeRO-3 it builds a DeepSpeed inference engine of its own, not run here yet.
PRECOMPUTED_UNDER = ("ddp", "zero2")
# Measured on one H200 (1.5B shape, 1,800 pairs of 351-token sequences): steps 1.33x faster without the reference
# forward under ddp (0.404 against 0.532-0.538 s), 1.30x under zero2 (0.423 against 0.551), which saves about 6.8 s
# per epoch there, and 27 s more before the first step. 13 of those were TRL's hash of every weight (measured on the
# CPU), which reference_named_without_hashing_its_weights below replaces; the rest, one pass over the rows, pays back
# from 2-3 epochs on that set (not measured again without the hash), sooner on larger ones.
PRECOMPUTE_FROM_EPOCHS = 3


def with_precompute(cfg: dict, strategy: str, decisions: list[str]) -> dict:
    """method.precompute_ref_log_probs (DPO's and KTO's): true, false or auto, made a bool. Precomputed, the
    reference log-probs take one forward pass over the data before the first step instead of one per row per
    epoch, so every step runs without it. auto: on for DPO over PRECOMPUTE_FROM_EPOCHS or more epochs under the
    strategies it was run under. cfg["train"]["fp8"] must be settled (launcher/fp8.py: with_fp8)."""
    method, wanted = method_of(cfg), cfg["method"].get("precompute_ref_log_probs")
    if wanted is None:  # ORPO, SimPO, SFT: no reference model, no key
        return cfg
    key = "method.precompute_ref_log_probs"
    if not (isinstance(wanted, bool) or wanted == "auto"):
        raise ConfigError(key, f"{key}={wanted!r}: give true, false or auto.")
    unsharded = "TRL 1.16 computes them with the whole unsharded model on every GPU before FSDP shards it"
    # TRL computes them as it is built, before launcher/fp8_linear.py switches the base to FP8: a bf16 reference
    # against an FP8 policy, whose rounding then no longer cancels in DPO's reward (launcher/fp8.py)
    fp8_forward = "the reference would be computed in bf16 and the policy in FP8 (train.fp8=true)"
    if wanted is True and strategy == "fsdp_qlora":
        raise ConfigError(key, f"{key}=true with strategy=fsdp_qlora: {unsharded}. Leave it false (auto) there.")
    if wanted is True and cfg["train"].get("fp8") is True:
        raise ConfigError(key, f"{key}=true with train.fp8=true: {fp8_forward}, so their rounding would not cancel. "
                               "Use train.fp8=backward (bf16 forward) or leave the log-probs computed at each step.")
    what = "computed once before the first step (TRL), cached in <run_dir>/datasets; no reference forward in the steps"
    if wanted != "auto":
        on = wanted
        untried = "" if strategy in PRECOMPUTED_UNDER else f" (not run under {strategy} yet)"
        decisions += [f"{key}=true: the reference log-probs {what}{untried}"] if on else []
        return dict(cfg, method=dict(cfg["method"], precompute_ref_log_probs=on))
    epochs, steps = cfg["train"]["epochs"], cfg["train"]["max_steps"]
    several = epochs >= PRECOMPUTE_FROM_EPOCHS and steps <= 0
    why_not = (f"train.epochs={epochs}{' with train.max_steps' if steps > 0 else ''}: the pass before the first "
               "step is paid back by steps without the reference forward (1.30-1.33x faster on an H200) from about "
               f"{PRECOMPUTE_FROM_EPOCHS} epochs (docs/benchmarks.md)" if not several else
               f"method={method.name}: measured for DPO only" if method.name != "dpo" else
               f"under fsdp_qlora {unsharded}" if strategy == "fsdp_qlora" else
               f"under {strategy}, where it has not been run" if strategy not in PRECOMPUTED_UNDER else
               fp8_forward if cfg["train"].get("fp8") is True else None)
    line = f"{epochs} epochs: the reference log-probs {what}" if why_not is None else why_not
    decisions.append(f"{key}=auto -> {'off' if why_not else 'on'}: {line}")
    return dict(cfg, method=dict(cfg["method"], precompute_ref_log_probs=why_not is None))


# Where TRL 1.16 keeps each method's trainer (a rank imports it while it waits for the launcher: launcher/gate.py)
TRAINER_MODULES = {"dpo": "trl.trainer.dpo_trainer", "kto": "trl.trainer.kto_trainer",
                   "orpo": "trl.experimental.orpo", "simpo": "trl.experimental.cpo", "sft": "trl.trainer.sft_trainer"}


def import_module(name: str):
    """A module, trl.experimental's without its warning that the API may change (we pin TRL and test each)."""
    import importlib

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*trl.experimental")
        return importlib.import_module(name)


def _experimental(module: str, *names: str):
    """Classes from trl.experimental.<module>."""
    mod = import_module(f"trl.experimental.{module}")
    return [getattr(mod, n) for n in names]


def training_config(method_cfg: dict, common: dict, plan: dict):
    """TRL's config object for this method: `common` holds the TrainingArguments every method shares."""
    name = method_cfg["name"]
    if name == "dpo":
        from trl import DPOConfig

        return DPOConfig(beta=method_cfg["beta"], loss_type=loss_types(method_cfg),
                         label_smoothing=method_cfg.get("label_smoothing", 0.0),
                         precompute_ref_log_probs=method_cfg["precompute_ref_log_probs"], **common)
    if name == "kto":
        from trl import KTOConfig

        return KTOConfig(beta=method_cfg["beta"], loss_type=method_cfg["loss_type"],
                         desirable_weight=method_cfg["desirable_weight"],
                         undesirable_weight=method_cfg["undesirable_weight"],
                         precompute_ref_log_probs=method_cfg["precompute_ref_log_probs"], **common)
    if name == "orpo":
        (ORPOConfig,) = _experimental("orpo", "ORPOConfig")
        return ORPOConfig(beta=method_cfg["beta"], remove_unused_columns=False, **common)  # (else it warns, and sets it)
    if name == "simpo":
        (CPOConfig,) = _experimental("cpo", "CPOConfig")
        return CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=method_cfg["beta"], simpo_gamma=method_cfg["gamma"],
                         remove_unused_columns=False, **common)
    from trl import SFTConfig

    # packing: whole rows into rows of max_length, padding-free (TRL's best-fit decreasing: no row is split)
    return SFTConfig(packing=plan["packing"], packing_strategy="bfd",
                     completion_only_loss=method_cfg["completion_only_loss"], **common)


@contextmanager
def k_bit_preparation_as_planned(trainer_class, kbit_prepare: bool):
    """ORPO's and CPO's trainers prepare a 4/8-bit model themselves (PEFT's prepare_model_for_kbit_training, then
    TRL's norms in float32). Where the plan leaves that out (FSDP and ZeRO flatten parameters of one dtype: "Must
    flatten tensors with uniform dtype", seen on 2x H200 with fsdp_qlora), they are kept from it, as the other
    trainers are; where the plan does it (ddp), launcher/modeling.py has done it already."""
    if kbit_prepare:
        yield
        return
    module = sys.modules[trainer_class.__module__]
    saved = module.prepare_model_for_kbit_training, module.peft_module_casting_to_bf16
    module.prepare_model_for_kbit_training = lambda model, **kwargs: model
    module.peft_module_casting_to_bf16 = lambda model: None
    try:
        yield
    finally:
        module.prepare_model_for_kbit_training, module.peft_module_casting_to_bf16 = saved


def model_identity(model) -> str:
    """A name for a model that says which it is without reading its weights: its class, config (with where it was
    loaded from and, for a hub id, the commit), its parameters' names, shapes and dtypes, and the size and time of
    each file of a local checkpoint."""
    import hashlib
    import json
    from pathlib import Path

    config = getattr(model, "config", None)
    source = str(getattr(config, "_name_or_path", "") or "")
    files = ([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(Path(source).iterdir()) if f.is_file()]
             if source and Path(source).is_dir() else [])
    described = [type(model).__name__, config.to_json_string() if config is not None else "", source,
                 str(getattr(config, "_commit_hash", None)), files,
                 [(n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()]]
    return hashlib.sha256(json.dumps(described, default=str).encode()).hexdigest()


@contextmanager
def reference_named_without_hashing_its_weights(trainer_class):
    """TRL names its cache of precomputed reference log-probs by a sha256 of every reference weight, copied to the
    host in float32: 13.3 s at 1.5B on a 2-core machine (about a minute at 8B), before the first step. The
    launcher keeps that cache in the run's own directory (<run_dir>/datasets), where a name saying which model it
    is (model_identity) tells a stale one apart as well."""
    module = sys.modules[trainer_class.__module__]
    saved = module.hash_module
    module.hash_module = model_identity
    try:
        yield
    finally:
        module.hash_module = saved


def build_trainer(cfg: dict, args, model, tokenizer, train_ds, eval_ds, callbacks, peft, load_reference):
    """The method's TRL trainer. `load_reference()` loads a frozen copy, asked for only where a full fine-tune
    keeps a reference model (with LoRA the reference is the adapter-disabled policy)."""
    method = method_of(cfg)
    data = dict(args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                peft_config=peft, callbacks=callbacks)
    if method.name in ("dpo", "kto"):
        from trl import DPOTrainer, KTOTrainer

        trainer_class = DPOTrainer if method.name == "dpo" else KTOTrainer
        # With precomputed log-probs TRL computes them with the policy before its first step (its weights are the
        # reference's then) and keeps no frozen copy, except under FSDP, where the launcher refuses precomputing
        frozen_copy = peft is None and not cfg["method"].get("precompute_ref_log_probs")
        ref_model = load_reference() if frozen_copy else None
        with reference_named_without_hashing_its_weights(trainer_class):
            return trainer_class(model=model, ref_model=ref_model, **data)
    if method.name in ("orpo", "simpo"):
        (trainer_class,) = (_experimental("orpo", "ORPOTrainer") if method.name == "orpo"
                            else _experimental("cpo", "CPOTrainer"))
        with k_bit_preparation_as_planned(trainer_class, cfg["plan"]["kbit_prepare"]):
            trainer = trainer_class(model=model, **data)
        score_label_tokens_only(trainer, nll_over_whole_chosen=method.name == "orpo")
        return trainer
    from trl import SFTTrainer

    return SFTTrainer(model=model, **data)


def score_label_tokens_only(trainer, nll_over_whole_chosen: bool) -> None:
    """TRL 1.16's ORPO and CPO trainers take their log-probs from the model's whole logits, [2 x pairs, length,
    vocabulary] (float32 under accelerate's autocast wrapper): with Qwen's 152k vocabulary that is most of their memory
    and much of their time (on 2x H200, ORPO ran 1.10x and SimPO 1.22x DPO's pairs/s, where no reference pass should
    give about 1.3x). Here they score only the tokens they learn from, through the fused, chunked LM head that TRL's
    own DPOTrainer uses (trl.trainer.utils.add_fused_lm_head). Their losses and metrics are TRL's, from the same
    log-probs, but logits/chosen and logits/rejected: averaged over the answer tokens, as DPO's are (TRL's ORPO and
    CPO average over every position of the padded batch, prompts and pads included)."""
    import torch
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from trl.trainer.utils import add_fused_lm_head

    model = trainer.model
    if trainer.is_encoder_decoder or isinstance(model.get_output_embeddings(), BaseTunerLayer):
        return  # (the head reads lm_head.weight directly: an adapter on it would not be trained)
    add_fused_lm_head(model.get_base_model() if isinstance(model, PeftModel) else model,
                      outputs=("log_probs", "mean_logits"))
    # ORPO's NLL term covers every real token of the chosen rows, the prompt's too; CPO's (SimPO: none) the answer's
    padding_value = trainer.padding_value if nll_over_whole_chosen else trainer.pad_token_id
    average = nll_over_whole_chosen or trainer.loss_type in ("ipo", "simpo")
    with_nll = nll_over_whole_chosen or trainer.cpo_alpha != 0

    def concatenated_forward(model, batch):
        inputs = trainer.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=padding_value,
                                             device=trainer.accelerator.device)
        n = batch["chosen_labels"].shape[0]
        ids, attention, answers = (inputs["concatenated_input_ids"], inputs["concatenated_attention_mask"],
                                   inputs["concatenated_labels"])
        labels = answers
        if nll_over_whole_chosen:  # the rejected rows need only their answers scored
            labels = torch.cat([ids[:n].masked_fill(attention[:n] == 0, -100), answers[n:]])
        kwargs = {"output_router_logits": True} if trainer.aux_loss_enabled else {}
        out = model(ids, attention_mask=attention, labels=labels, fused_lm_head=True, use_cache=False, **kwargs)
        log_probs = out.log_probs.float()  # [2n, length-1]: token t+1's, 0 where its label is -100
        answer = answers[:, 1:] != -100
        per_row = (log_probs * answer).sum(-1)
        if average:
            per_row = per_row / answer.sum(-1)
        nll = torch.tensor(0.0, device=ids.device)
        if with_nll:
            scored = labels[:n, 1:] != -100
            nll = -(log_probs[:n] * scored).sum() / scored.sum()
        mean_logits = [(out.mean_logits[rows] * answer[rows]).sum() / answer[rows].sum()
                       for rows in (slice(None, n), slice(n, None))]
        result = (per_row[:n], per_row[n:], *mean_logits, nll)
        return (*result, out.aux_loss) if trainer.aux_loss_enabled else result

    trainer.concatenated_forward = concatenated_forward


def held_out_summary(method: str, metrics: dict) -> str | None:
    """The line the console and the summary print for the held-out result, from the trainer's eval_* metrics."""
    if method == "kto" and "eval_rewards/chosen" in metrics and "eval_rewards/rejected" in metrics:
        gap = metrics["eval_rewards/chosen"] - metrics["eval_rewards/rejected"]
        return (f"held-out reward gap {gap:.3f} (desirable {metrics['eval_rewards/chosen']:.3f} over undesirable "
                f"{metrics['eval_rewards/rejected']:.3f}; 0 before training)")
    if "eval_rewards/accuracies" in metrics:
        return (f"held-out reward accuracy {metrics['eval_rewards/accuracies']:.3f} "
                f"(chance 0.5), margin {metrics.get('eval_rewards/margins', 0):.3f}")
    return None
