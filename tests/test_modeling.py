"""Model helpers (launcher/modeling.py) on the embedded tiny model."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import lora_model, lora_model_with_b
from launcher import checkpoints, modeling


def test_restore_adapter_brings_back_the_checkpointed_weights(tmp_path, tiny_dir):
    trained = lora_model(tiny_dir)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.add_(0.5)  # lora_B starts at zero: a restored adapter differs from a fresh one
    trained.save_pretrained(tmp_path / "checkpoint-5")
    fresh = lora_model(tiny_dir)
    modeling.restore_adapter(fresh, str(tmp_path / "checkpoint-5"))
    want = {n: p for n, p in trained.named_parameters() if "lora_" in n}
    got = {n: p for n, p in fresh.named_parameters() if "lora_" in n}
    assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)


def test_restore_adapter_says_which_file_is_missing_or_empty(tmp_path, tiny_dir):
    with pytest.raises(FileNotFoundError, match="checkpoint-5/adapter_model.safetensors: missing or empty"):
        modeling.restore_adapter(lora_model(tiny_dir), str(tmp_path / "checkpoint-5"))
    (tmp_path / "checkpoint-5").mkdir()
    save_file({}, str(tmp_path / "checkpoint-5" / "adapter_model.safetensors"))
    with pytest.raises(FileNotFoundError, match="missing or empty"):
        modeling.restore_adapter(lora_model(tiny_dir), str(tmp_path / "checkpoint-5"))


def leave_gloo():
    """End a spawned CPU rank once both ranks have written what the test reads. Tearing gloo down, even after a
    barrier and destroy_process_group, now and then aborts a rank in CI (SIGABRT, "terminate called without an
    active exception", twice so far); os._exit skips the C++ teardown, and the OS closes the sockets."""
    dist.barrier()
    os._exit(0)


def save_adapter_under_fsdp1(rank, tiny_dir, out, port, fixed):
    """One of 2 CPU ranks: wrap a LoRA model in FSDP1 as accelerate does for fsdp_qlora (layer by layer, PEFT's
    wrap policy, use_orig_params=False) and save the adapter as the Trainer does (full state dict -> rank 0)."""
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    if fixed:
        modeling.find_adapter_weights_under_fsdp1()
    model = lora_model_with_b(tiny_dir, 0.5)
    wrapped = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), device_id=torch.device("cpu"),
                   use_orig_params=False)
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True)):
        state = wrapped.state_dict()
    if rank == 0:
        model.save_pretrained(out, state_dict=state)
    leave_gloo()


@pytest.mark.parametrize("fixed", [False, True], ids=["peft-alone", "with-launcher-fix"])
def test_an_adapter_saved_under_fsdp1_holds_its_weights(tmp_path, tiny_dir, fixed):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(save_adapter_under_fsdp1, args=(tiny_dir, tmp_path, port, fixed), nprocs=2)
    lora_tensors = sum("lora_" in n for n, _ in lora_model(tiny_dir).named_parameters())
    if not fixed:  # PEFT 0.21's own save: fails once PEFT finds the adapter itself, and the fix can go
        assert checkpoints.adapter_tensor_count(tmp_path) == 0
        return
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(saved) == lora_tensors
    assert all(torch.all(t == 0.5) for k, t in saved.items() if "lora_B" in k)


def halves_of_a_batch():
    ids = torch.randint(2, 60, (4, 16), generator=torch.Generator().manual_seed(1))
    return ids[:2], ids[2:]


def train_a_step_with_adapters_in_layer_units(rank, tiny_dir, out, port):
    """One of 2 CPU ranks: FSDP1 over decoder layers only, each layer's LoRA matrices inside its unit
    (use_orig_params=True), as strategy.adapters_in_layer_units plans it; one backward on this rank's half of
    the batch; rank 0 keeps the whole gradients and saves the adapter as the Trainer does."""
    import functools

    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    modeling.find_adapter_weights_under_fsdp1()
    model = lora_model_with_b(tiny_dir, 0.5)
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={Qwen2DecoderLayer})
    wrapped = FSDP(model, auto_wrap_policy=policy, device_id=torch.device("cpu"), use_orig_params=True)
    units = sum(isinstance(m, FSDP) for m in wrapped.modules())
    ids = halves_of_a_batch()[rank]
    wrapped(input_ids=ids, labels=ids).loss.backward()
    with FSDP.summon_full_params(wrapped, with_grads=True):
        grads = {n.replace("_fsdp_wrapped_module.", ""): p.grad.clone() for n, p in wrapped.named_parameters()
                 if p.requires_grad}
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True)):
        state = wrapped.state_dict()
    if rank == 0:
        model.save_pretrained(out, state_dict=state)
        torch.save({"units": units, "grads": grads}, out / "grads.pt")
    leave_gloo()


def test_adapters_in_layer_units_get_the_gradients_of_the_whole_batch_and_are_saved(tmp_path, tiny_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(train_a_step_with_adapters_in_layer_units, args=(tiny_dir, tmp_path, port), nprocs=2)
    got = torch.load(tmp_path / "grads.pt")
    model = lora_model_with_b(tiny_dir, 0.5)
    first, second = halves_of_a_batch()
    ((model(input_ids=first, labels=first).loss + model(input_ids=second, labels=second).loss) / 2).backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert got["units"] == model.config.num_hidden_layers + 1  # the layers and the root, no unit per LoRA matrix
    assert got["grads"].keys() == want.keys() and all(want[n].abs().sum() > 0 for n in want)
    assert all(torch.allclose(got["grads"][n], want[n], rtol=1e-4, atol=1e-6) for n in want)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(saved) == len(want) and all(torch.all(t == 0.5) for k, t in saved.items() if "lora_B" in k)


def test_keep_adapters_in_layer_units_puts_accelerates_wrap_policy_back(tiny_dir):
    """transformers' own update (PEFT's policy: a unit per LoRA matrix), then with the launcher's fix."""
    from types import SimpleNamespace

    import transformers.trainer as trainer_module
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    original = trainer_module.update_fsdp_plugin_peft
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=FullyShardedDataParallelPlugin(
        fsdp_version=1, auto_wrap_policy="transformer_based_wrap")))
    model = lora_model(tiny_dir)
    try:
        trainer_module.update_fsdp_plugin_peft(model, accelerator)
        assert accelerator.state.fsdp_plugin.auto_wrap_policy is not transformer_auto_wrap_policy  # PEFT's
        accelerator.state.fsdp_plugin.auto_wrap_policy = transformer_auto_wrap_policy
        modeling.keep_adapters_in_layer_units()
        trainer_module.update_fsdp_plugin_peft(model, accelerator)
        assert accelerator.state.fsdp_plugin.auto_wrap_policy is transformer_auto_wrap_policy
    finally:
        trainer_module.update_fsdp_plugin_peft = original


def test_zero3_whole_layer_fetch_marks_the_decoder_layers_and_nothing_else(tiny_dir):
    model = lora_model(tiny_dir)
    assert modeling.fetch_whole_layers_under_zero3(model) == ["Qwen2DecoderLayer"]
    leaves = [name for name, m in model.named_modules() if getattr(m, "_z3_leaf", False)]
    layers = [f"base_model.model.model.layers.{i}" for i in range(model.config.num_hidden_layers)]
    assert leaves == layers  # each layer once; its LoRA sub-modules are fetched with it, not on their own
    # the first layer's input needs a gradient, else ZeRO-3 reduces that layer's before they exist
    assert model.get_input_embeddings()(torch.tensor([[1, 2]])).requires_grad


def test_adapters_fed_bf16_activations_compute_what_peft_computes_under_autocast(tiny_dir):
    """DDP's float32 LoRA weights under bf16 autocast: without PEFT's float32 copy of each adapter input, the loss
    and the adapter gradients are the same (autocast multiplies in bf16 either way)."""
    def loss_and_grads(cast: bool):
        model = lora_model(tiny_dir)
        model.base_model.model.to(torch.bfloat16)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()  # as PEFT keeps them under DDP
                if "lora_B" in name:
                    param.data += 0.01  # lora_B starts at zero, which would hide any difference
        if not cast:
            assert modeling.feed_adapters_the_activations_as_they_are(model) == 7 * model.config.num_hidden_layers
        ids = torch.arange(2, 34).reshape(2, 16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    loss_cast, grads_cast = loss_and_grads(cast=True)
    loss_as_is, grads_as_is = loss_and_grads(cast=False)
    assert torch.equal(loss_cast, loss_as_is)
    assert grads_cast.keys() == grads_as_is.keys() and all(g.dtype == torch.float32 for g in grads_as_is.values())
    assert all(torch.equal(grads_cast[n], grads_as_is[n]) for n in grads_cast)
    assert any(grads_as_is[n].abs().sum() > 0 for n in grads_as_is if "lora_A" in n)


def lora_loss_and_grads(tiny_dir, fused: bool, autocast: bool = False, bf16_base: bool = False):
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir / "model"),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data += 0.01  # lora_B starts at zero, which would hide any difference
        elif "lora_" not in name and bf16_base:  # the bf16 base of DDP, kept in float32 or stored in bf16
            param.data = param.data.bfloat16() if autocast else param.data.bfloat16().float()
    if fused:
        assert modeling.add_adapter_outputs_inside_the_matmul(model) == 7 * model.config.num_hidden_layers
    ids = torch.arange(2, 34).reshape(2, 16)
    torch.manual_seed(1)  # the same dropout masks, drawn in the same order
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
        with model.disable_adapter():
            ref = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach().float(), ref.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


def test_lora_sum_inside_the_matmul_computes_what_peft_computes(tiny_dir):
    """One addmm in place of PEFT's `result + lora_B(lora_A(dropout(x))) * scaling`: in float32 the same loss and
    adapter gradients, with dropout on; where the adapter is disabled (DPO's reference pass), PEFT's forward."""
    loss, ref, grads = lora_loss_and_grads(tiny_dir, fused=False)
    fused_loss, fused_ref, fused_grads = lora_loss_and_grads(tiny_dir, fused=True)
    assert loss != ref and torch.equal(ref, fused_ref)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=0)
    assert grads.keys() == fused_grads.keys()
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_lora_sum_inside_the_matmul_under_bf16_autocast_is_as_close_to_float32_as_peft(tiny_dir):
    """DDP's case: bf16 base, float32 adapters, bf16 autocast. bf16 rounding moves both from the float32 result
    (on the same weights) by about 2% in some gradient; the fused sum may not move it further than PEFT's."""
    def error(fused):
        loss, _, grads = lora_loss_and_grads(tiny_dir, fused, autocast=True, bf16_base=True)
        return abs(loss - loss32) / loss32, max(((grads[n] - grads32[n]).norm() / grads32[n].norm()).item() for n in grads)

    loss32, _, grads32 = lora_loss_and_grads(tiny_dir, fused=False, bf16_base=True)
    (peft_loss_err, peft_grad_err), (fused_loss_err, fused_grad_err) = error(False), error(True)
    assert 0 < peft_grad_err < 0.1  # the comparison sees bf16's rounding, and nothing worse
    assert fused_loss_err <= 1.5 * peft_loss_err + 1e-5 and fused_grad_err <= 1.5 * peft_grad_err



def test_lora_sum_is_added_into_the_base_output_in_place(tiny_dir):
    """The adapter's product goes into the base layer's own output (addmm_): no copy of the whole output, which
    out-of-place addmm makes first (the profile's Memcpy DtoD, one per adapted linear per step); under bf16
    autocast too (DDP: float32 adapter weights)."""
    for autocast in (False, True):
        model = lora_model_with_b(tiny_dir, 0.05)
        assert modeling.add_adapter_outputs_inside_the_matmul(model) == 7 * model.config.num_hidden_layers
        layer = model.base_model.model.model.layers[0].mlp.down_proj
        seen = {}
        layer.base_layer.register_forward_hook(lambda mod, args, out: seen.update(ptr=out.data_ptr()))
        x = torch.randn(2, 16, layer.in_features, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = layer(x)
        assert out.shape == (2, 16, layer.out_features) and out.data_ptr() == seen["ptr"]
        out.float().sum().backward()  # autograd accepts the in-place sum: the base output is not saved for backward
        assert x.grad.abs().sum() > 0 and layer.lora_A["default"].weight.grad.abs().sum() > 0


def test_a_base_layer_that_returns_a_view_gets_the_sum_out_of_place(tiny_dir):
    """A view (a base layer that reshapes its output) is not summed into in place, where autograd would copy it
    back into its base: the out-of-place addmm runs and the output is PEFT's."""
    model = lora_model_with_b(tiny_dir, 0.05)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 16, layer.in_features)
    model.eval()  # no dropout: PEFT's output and the fused one compare exactly
    with torch.no_grad():
        expected = layer(x)
    modeling.add_adapter_outputs_inside_the_matmul(model)
    linear = layer.base_layer.forward
    seen = {}

    def as_view(rows):
        out = linear(rows)
        seen["ptr"] = out.data_ptr()
        return out.view(out.shape)

    layer.base_layer.forward = as_view
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out, expected)
    assert out.data_ptr() != seen["ptr"]


def test_the_merged_model_gives_the_adapter_on_base_outputs(tmp_path, tiny_dir, tiny_tokenizer):
    """merge_adapter reloads the base from disk in 16-bit on GPUs (float32 here) and folds the adapter in: the merged
    model must answer as the adapter on its base does, whatever ran during training (train.fp8 included: the merge
    never sees FP8 weights)."""
    from peft import PeftModel

    adapter = tmp_path / "final"
    lora_model_with_b(tiny_dir, 0.05).save_pretrained(adapter)
    tiny_tokenizer.save_pretrained(adapter)
    cfg = {"plan": {"device": "cpu", "dtype": "float32", "model_path": str(tiny_dir / "model")},
           "model": {"trust_remote_code": False}}
    modeling.merge_adapter(cfg, str(adapter), str(tmp_path / "merged"))
    ids = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir / "model"), adapter)
        base = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")(ids).logits
        expected = on_base(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(ids).logits
    assert (expected - base).abs().max() > 1e-3  # the adapter changes the outputs: the comparison means something
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
