"""The one training entrypoint every rank runs: `python -m launcher.train <run_dir>/config.yaml`.

Reads top to bottom: config -> logging -> training arguments -> tokenizer -> data -> model ->
trainer -> resume -> train -> evaluate -> save (-> merge). Strategy decisions were made by the
planner and arrive in the config's `plan` section.
"""
from __future__ import annotations

from launcher import early_logs

early_logs.hold()  # first: some libraries warn as they are imported

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

import torch
import yaml
from transformers import TrainerCallback, set_seed
from transformers.trainer_callback import PrinterCallback

from launcher import (checkpoints, compiling, console, data, fp8_linear, gate, host_work, logs, methods,
                      modeling, padding_free, postmortem, profiling, samplers, samples, step_metrics)
from launcher.errors import TrainingStopped

log = logging.getLogger("launcher")


def training_args(cfg: dict, report_to: list[str]):
    plan, train, method = cfg["plan"], cfg["train"], cfg["method"]
    common = dict(
        output_dir=str(Path(cfg["run_dir"], "checkpoints")),
        run_name=cfg["run_name"],
        per_device_train_batch_size=cfg["micro_batch"],
        per_device_eval_batch_size=cfg["micro_batch"],
        gradient_accumulation_steps=train["grad_accum"],
        learning_rate=train["lr"],
        num_train_epochs=train["epochs"],
        max_steps=train["max_steps"],
        warmup_steps=train["warmup_ratio"],  # transformers 5: a float below 1 is a ratio of the total
        lr_scheduler_type=train["lr_scheduler"],
        weight_decay=train["weight_decay"],
        max_grad_norm=train["max_grad_norm"],
        optim=plan["optim"],
        dataloader_num_workers=plan["dataloader_workers"],
        logging_steps=train["logging_steps"],
        save_strategy="steps",
        save_steps=cfg["save_steps"],
        save_total_limit=train["save_total_limit"],
        eval_strategy="steps" if train["eval_steps"] else "no",
        eval_steps=train["eval_steps"],
        seed=cfg["seed"],
        bf16=plan["dtype"] == "bfloat16",
        fp16=plan["dtype"] == "float16",
        use_cpu=plan["device"] == "cpu",
        gradient_checkpointing=plan["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False},
        use_liger_kernel=plan["liger"],
        # TRL computes DPO/SFT log-probs with its own chunked LM head; Liger's fused cross-entropy would replace it
        liger_kernel_config={"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                             "fused_linear_cross_entropy": False} if plan["liger"] else None,
        report_to=report_to or "none",
        # Neither reads a value back from the GPU each step (a sync that idles it while the host fetches the next
        # batch): tokens are counted from TRL's own num_tokens metric, and a nan loss is logged as nan.
        include_num_input_tokens_seen="no",
        logging_nan_inf_filter=False,
        ddp_find_unused_parameters=False,
        ddp_broadcast_buffers=False,  # a causal LM's buffers (rotary frequencies) never change: no broadcasts
        max_length=method["max_length"],
        dataset_num_proc=None,
        disable_tqdm=True,  # rank 0 prints a line per log instead: readable in files and Slurm logs
    )
    if plan["deepspeed_config"]:
        common["deepspeed"] = plan["deepspeed_config"]
    if plan["fsdp_config"]:
        common.update(fsdp=True, fsdp_config=dict(plan["fsdp_config"]))
    if plan["device"] == "cpu":
        common["ddp_backend"] = "gloo"
    args = methods.training_config(method, common, plan)
    if plan["device"] == "cpu" and args.device.index is not None:
        # With several CPU processes transformers 5.17 picks device 'cpu:0', and torch 2.13 cannot map
        # a checkpoint's optimizer state to 'cpu:0' on resume. Plain 'cpu' is the same device.
        args.__dict__["_setup_devices"] = torch.device("cpu")
    return args


class StartupBanner(TrainerCallback):
    """At the first step (the model is wrapped by then): stop if the wrapper in effect is not the planned
    one, and print rank 0's banner. `trainer` is set once the trainer exists."""

    def __init__(self, cfg: dict, report):
        self.cfg, self.report, self.trainer, self.shown = cfg, report, None, False

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.shown:
            self.shown = True
            self.check()

    def check(self) -> None:
        plan, trainer = self.cfg["plan"], self.trainer
        wrapped = type(trainer.model_wrapped).__name__
        expected = plan["expected_wrapper"]
        if expected and wrapped != expected:
            raise RuntimeError(f"planned strategy {plan['strategy']} expects the model wrapped in {expected}, "
                               f"but the trainer runs {wrapped}: the launch did not set up {plan['strategy']}")
        if not trainer.is_world_process_zero():
            return
        model = trainer.model
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        if hasattr(model, "get_nb_trainable_parameters"):
            trainable, total = model.get_nb_trainable_parameters()
        args = trainer.args
        effective = args.per_device_train_batch_size * args.gradient_accumulation_steps * plan["world_size"]
        ddp = trainer.model_wrapped
        if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            wrapped += (f" (gradient_as_bucket_view={ddp.gradient_as_bucket_view}, "
                        f"broadcast_buffers={ddp.broadcast_buffers})")
        lines = [
            f"world size {plan['world_size']} ({plan['backend']}), strategy {plan['strategy']}, wrapped in {wrapped}",
            f"model {plan['model_path']}: dtype {plan['dtype']}, quant {self.cfg['quant']['name']}"
            + (f" (storage {plan['quant_storage_dtype']})" if plan["quant_storage_dtype"] else ""),
            f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / max(total, 1):.2f}%)",
            f"batch: {args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} accumulation "
            f"x {plan['world_size']} ranks = {effective} effective",
            f"method {self.cfg['method']['name']}; {self.report.line(self.cfg['data']['max_length'])}",
            *[f"plan: {d}" for d in plan["decisions"]],
        ]
        log.info("=" * 72 + "\n" + "\n".join(lines) + "\n" + "=" * 72)


def main(config_path: str) -> int:
    waited = gate.wait()  # started early: the libraries are imported, the launcher's checks have passed
    cfg = yaml.safe_load(Path(config_path).read_text())
    plan, run_dir = cfg["plan"], cfg["run_dir"]
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    console.setup(run_dir, rank)
    log.debug("%s: rank %d, pid %d, host %s", postmortem.STARTED, rank, os.getpid(), socket.gethostname())
    if os.environ.get(gate.ENV):
        log.debug("imported its libraries, then waited %.1f s for the launcher's checks", waited)
    postmortem.say_when_stopped(log)
    started = time.time()
    report_to = logs.configure_trackers(cfg["logging"], cfg["run_name"], run_dir) if rank == 0 else []
    args = training_args(cfg, report_to)  # first: it sets up the process group (and ZeRO-3's zero.Init)
    set_seed(cfg["seed"])

    tokenizer = modeling.load_tokenizer(cfg)
    try:
        with args.main_process_first(desc="dataset"):
            train_ds, eval_ds, report = data.prepare(cfg["data"], cfg["method"]["name"], tokenizer, cfg["seed"])
    except data.DataError as err:
        if rank == 0:
            log.error("launcher: data error: %s", err)
        return 2
    log.debug(report.line(cfg["data"]["max_length"]))  # the banner shows it, once
    if cfg["method"].get("precompute_ref_log_probs"):  # TRL caches them beside the dataset's files: run_dir's
        with args.main_process_first(local=False, desc="dataset on disk"):
            train_ds, eval_ds = data.shared_on_disk(train_ds, eval_ds, Path(run_dir, "datasets"), rank == 0)

    model, loading = modeling.load_model_timed(cfg, local_rank)
    if plan["zero3_whole_layers"]:
        modeling.fetch_whole_layers_under_zero3(model)  # before the Trainer hands the model to DeepSpeed
    banner = StartupBanner(cfg, report)
    stop = checkpoints.stop_request_callback(run_dir)
    records = logs.MetricsCallback(run_dir, plan["world_size"])
    non_finite = logs.NonFiniteLoss(float16=plan["dtype"] == "float16")
    callbacks = [non_finite, records, console.Progress(), checkpoints.complete_marker_callback(), banner, stop,
                 logs.Heartbeat(run_dir, rank)]
    if cfg["train"]["step_clock"]:
        callbacks.append(logs.StepClock(run_dir))
    if plan["compile"]:
        callbacks.append(logs.CompileReport())
    if cfg["train"]["profile_steps"]:
        callbacks.append(profiling.ProfileSteps(run_dir, *cfg["train"]["profile_steps"]))
    if plan["fsdp_config"]:
        modeling.find_adapter_weights_under_fsdp1()  # else PEFT 0.21 saves empty adapters under FSDP1
    if plan["fsdp_adapters_in_layers"]:
        modeling.keep_adapters_in_layer_units()
    reference = lambda: modeling.load_model(cfg, local_rank)  # noqa: E731 (a full fine-tune's frozen copy)
    trainer = methods.build_trainer(cfg, args, model, tokenizer, train_ds, eval_ds, callbacks,
                                    peft=modeling.lora_config(cfg), load_reference=reference)
    banner.trainer = trainer
    console.route_libraries()  # DeepSpeed's logger, made as the trainer imported it
    if plan["padding_free"] and cfg["method"]["name"] == "dpo":
        padding_free.unpad_preference_batches(trainer)
    elif plan["padding_free"]:  # SFT: TRL's packing is padding-free already
        padding_free.packed_rows_attend_by_boundaries(trainer)
    samplers.use_planned_sampler(trainer, plan, cfg["method"]["max_length"], cfg["seed"])
    records.count_computed_tokens(trainer.model)
    modeling.cast_trainable(trainer.model, plan["trainable_dtype"])
    if not plan["adapter_input_cast"]:
        modeling.feed_adapters_the_activations_as_they_are(trainer.model)
    if plan["fuse_lora_sum"]:
        modeling.add_adapter_outputs_inside_the_matmul(trainer.model, plan["lora_dropout_kernel"],
                                                       plan["lora_one_node"])
    if plan["fp8"]:
        fp8_linear.compute_frozen_linears_in_fp8(trainer.model, plan["fp8_min_features"], plan["fp8_cache_weights"],
                                                 forward=plan["fp8_forward"])
    if plan["compile"]:  # last of the model's changes: compiled in place, the forwards patched above included
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.expanduser(compiling.CACHE_DIR))
        modeling.compile_layers_in_place(trainer.model)
    if plan["trim_host_work"]:
        host_work.trim(trainer, cfg)
    if plan["metrics_sync"] == "log":
        log.debug("%s", step_metrics.sync_metrics_at_log(trainer))
    if trainer.accelerator.ddp_handler is not None:  # DDP: gradients live in its all-reduce buckets, no copies
        trainer.accelerator.ddp_handler.gradient_as_bucket_view = True
    trainer.remove_callback(PrinterCallback)  # console.Progress shows rank 0's progress instead

    resume_from = checkpoints.find_resume(run_dir, cfg["resume"])
    if resume_from and trainer.is_fsdp_enabled and cfg["lora"]["r"] is not None:
        modeling.restore_adapter(trainer.model, resume_from)  # before train() wraps it; see restore_adapter
    # No evaluate() before train(): in transformers 5.17 it marks the model as prepared, and training then
    # runs without the DDP wrapper (no gradient sync). StartupBanner stops such a run.
    result = trainer.train(resume_from_checkpoint=resume_from)
    if stop.requested:  # the launcher exits 75 on seeing STOPPED (torchrun would turn our code into 1)
        if trainer.is_world_process_zero():
            Path(run_dir, checkpoints.STOPPED_FILE).write_text(f"{trainer.state.global_step}\n")
        log.info("stopped on request at step %d; `resume=auto` continues from there", trainer.state.global_step)
        log.debug("%s", postmortem.FINISHED)
        return 0
    if non_finite.bad:  # no final adapter, merged model or summary of poisoned weights
        raise TrainingStopped(non_finite.message(cfg))
    metrics = trainer.evaluate()

    final = Path(run_dir, "final")
    if trainer.is_fsdp_enabled:  # the final adapter must be whole, also where checkpoints were set to sharded
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(final))  # LoRA: the adapter only; ZeRO-3: gathered 16-bit weights
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(final)
        checkpoints.require_adapter_weights(final)
    if cfg["merge"] and cfg["lora"]["r"] is not None:
        trainer.accelerator.wait_for_everyone()
        if trainer.is_world_process_zero():
            modeling.merge_adapter(cfg, str(final), str(Path(run_dir, "merged")))
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        summary = {"run_dir": run_dir, "global_step": trainer.state.global_step,
                   "train_loss": records.this_launch_loss(result.training_loss, trainer.state.global_step),
                   "seconds": round(time.time() - started, 1), **loading,
                   "host_private_gib": modeling.private_memory_gib(),  # rank 0's, at the end
                   **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        Path(run_dir, "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print_summary(cfg, summary)
    samples.write_samples(trainer, cfg, eval_ds, tokenizer)  # last: the run's results are all written by now
    log.debug("%s", postmortem.FINISHED)
    return 0


def print_summary(cfg: dict, summary: dict) -> None:
    run_dir = summary["run_dir"]
    lines = [f"done: {summary['global_step']} steps in {summary['seconds']} s, train loss {summary['train_loss']:.4f}"]
    if held_out := methods.held_out_summary(cfg["method"]["name"], summary):
        lines.append(held_out)
    if "eval_loss" in summary:
        lines.append(f"held-out loss {summary['eval_loss']:.4f}")
    lines += [f"adapter + tokenizer: {run_dir}/final", f"checkpoints: {run_dir}/checkpoints",
              f"metrics: {run_dir}/metrics.jsonl, logs: {run_dir}/logs/, summary: {run_dir}/summary.json"]
    if cfg["merge"]:
        lines.append(f"merged model: {run_dir}/merged")
    log.info("\n".join(lines))


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher may add it
    if len(argv) != 1:
        sys.exit("usage: python -m launcher.train <run_dir>/config.yaml")
    try:
        code = main(argv[0])
    except TrainingStopped as err:  # its reason on a line of its own, which the launcher's post-mortem shows
        log.error("%s:\n%s", postmortem.FAILED, err)
        code = 1
    except Exception:
        log.exception(postmortem.FAILED)  # into this rank's log file too, not only stderr
        raise
    if torch.distributed.is_initialized():
        # Left to the interpreter's exit, gloo's threads can abort a rank that finishes before the others
        # ("terminate called without an active exception", seen in CI while rank 0 closed wandb)
        torch.distributed.destroy_process_group()
    sys.exit(code)
