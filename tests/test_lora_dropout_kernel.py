"""launcher/lora_dropout_kernel.py on a CUDA GPU: the kernel's forward and backward against torch computing the same
dropout (the kernel's own mask) in the same dtype, the mask's statistics against Bernoulli(1 - p), and a PEFT LoRA
layer through launcher/modeling.py's forward. The rules for when it runs: tests/test_lora_dropout.py (CPU)."""
import math

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs")]


def reference(x, weight, keep, p):
    """lora_A(dropout(x)) as torch computes it (bf16 matmul over the dropped copy), with the given mask and the
    kernel's scale (1 / (1 - p) for p rounded to 16 bits)."""
    from launcher.lora_dropout_kernel import threshold_and_scale

    dropped = (x.float() * keep * threshold_and_scale(p)[1]).to(x.dtype)
    return dropped @ weight.to(x.dtype).t()


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("shape, rank", [((3, 700, 1536), 16), ((1000, 8960), 16), ((257, 200), 8), ((64, 384), 64)])
def test_forward_and_backward_equal_torch_with_the_kernels_mask(shape, rank):
    from launcher.lora_dropout_kernel import DropoutThenDown, keep_mask

    torch.manual_seed(0)
    p, seed = 0.1, 1234
    x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(rank, shape[-1], device="cuda") / math.sqrt(shape[-1])).requires_grad_(True)  # fp32, as DDP
    keep = keep_mask(x, p, seed)
    out = DropoutThenDown.apply(x, weight, p, seed)
    grad = torch.randn_like(out)
    out.backward(grad)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = weight.detach().clone().requires_grad_(True)
    ref = reference(x_ref, w_ref, keep, p)
    ref.backward(grad)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2
    assert rel_err(x.grad, x_ref.grad) < 1e-2
    assert weight.grad.dtype == torch.float32 and rel_err(weight.grad, w_ref.grad) < 1e-2
    assert (x.grad[~keep] == 0).all()  # dropped elements pass no gradient
    # the same seed draws the same mask; another seed another one
    assert torch.equal(DropoutThenDown.apply(x.detach(), weight.detach(), p, seed), out.detach())
    assert not torch.equal(keep_mask(x, p, seed + 1), keep)


def test_the_mask_is_bernoulli_with_the_keep_probability_in_every_column_and_row():
    from launcher.lora_dropout_kernel import keep_mask, threshold_and_scale

    T, K, p = 4096, 1536, 0.05
    keep = keep_mask(torch.zeros(T, K, device="cuda", dtype=torch.bfloat16), p, 7).float()
    n = T * K
    assert threshold_and_scale(p) == (3277, 65536 / (65536 - 3277))  # p' = 0.0500031
    assert abs(keep.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    per_column = keep.mean(0)  # each column over 4096 rows: no column (quarter of a block) stuck or skewed
    assert (per_column - (1 - p)).abs().max().item() < 6 * math.sqrt(p * (1 - p) / T)
    per_row = keep.mean(1)
    assert (per_row - (1 - p)).abs().max().item() < 6 * math.sqrt(p * (1 - p) / K)
    drop = 1 - keep  # neighbours, within a quarter and across quarters of a block, and across rows: independent
    # neighbours: within a group, the two halves of one Philox word (16 apart), two words of one call (32 apart),
    # and rows: independent
    for a, b in ((drop[:, :-1], drop[:, 1:]), (drop[:, :-16], drop[:, 16:]), (drop[:, :-32], drop[:, 32:]),
                 (drop[:-1], drop[1:])):
        both = (a * b).mean().item()
        assert abs(both - p * p) < 6 * math.sqrt(p * p / a.numel())


def test_peft_lora_layer_trains_the_same_in_expectation_through_the_kernel(monkeypatch):
    """A PEFT LoRA linear with dropout, through modeling.add_adapter_outputs_inside_the_matmul with the kernel:
    in eval mode the output equals PEFT's; in training the mean over many draws of the output and of the
    gradients equals the no-dropout values (dropout is unbiased), within the noise of the draws."""
    from peft import LoraConfig, get_peft_model

    from launcher import lora_dropout_kernel, modeling

    calls = []
    real = lora_dropout_kernel.forward_pass
    monkeypatch.setattr(lora_dropout_kernel, "forward_pass", lambda *a: calls.append(1) or real(*a))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(512, 256, bias=False)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    net = get_peft_model(Net().cuda(), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1, target_modules=["proj"]))
    net.to(torch.bfloat16)  # adapters too (ZeRO-2's case; DDP's float32 adapters run under autocast)
    layer = net.base_model.model.proj
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    x = torch.randn(2, 300, 512, device="cuda", dtype=torch.bfloat16)
    net.eval()
    with torch.no_grad():
        expected = net(x)
    assert modeling.add_adapter_outputs_inside_the_matmul(net, dropout_kernel=True) == 1
    with torch.no_grad():
        assert rel_err(net(x), expected) < 1e-2  # eval: no dropout, the kernel does not run
    net.train()
    a = layer.lora_A["default"].weight
    draws, outs, grads = 200, [], []
    for _ in range(draws):
        out = net(x)
        (g,) = torch.autograd.grad(out.float().pow(2).mean(), a)
        outs.append(out.float())
        grads.append(g.float())
    first, second = outs[0], outs[1]
    assert len(calls) == draws and not torch.equal(first, second)  # the kernel ran, each call with its own mask
    layer.lora_dropout["default"].p = 0.0  # the kernel's path is skipped at p=0: PEFT's own computation
    clean = net(x).float()
    (clean_grad,) = torch.autograd.grad(clean.pow(2).mean(), a)
    mean_out = torch.stack(outs).mean(0)
    lora_part = (clean - net.base_model.model.proj.base_layer(x).float())
    assert rel_err(mean_out - net.base_model.model.proj.base_layer(x).float(), lora_part) < 0.05
    assert rel_err(torch.stack(grads).mean(0), clean_grad.float()) < 0.1


def test_checkpointing_recomputes_the_same_mask():
    """transformers' gradient checkpointing recomputes a layer's forward in the backward: torch.utils.checkpoint
    restores the CPU RNG state, from which the kernel's seed is drawn, so the gradients equal a plain run's."""
    from torch.utils.checkpoint import checkpoint

    from launcher.lora_dropout_kernel import dropout_then_down

    x = torch.randn(512, 1536, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(16, 1536, device="cuda", requires_grad=True)
    torch.manual_seed(5)
    dropout_then_down(x, weight, 0.1).float().square().sum().backward()
    plain = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    torch.manual_seed(5)
    checkpoint(lambda t: dropout_then_down(t, weight, 0.1), x, use_reentrant=False).float().square().sum().backward()
    assert torch.equal(x.grad, plain[0]) and torch.equal(weight.grad, plain[1])


def test_ddp_s_float32_adapters_under_autocast_take_the_kernel(monkeypatch):
    """DDP's case: float32 LoRA weights, bf16 activations under bf16 autocast, PEFT's input cast off (the plan's
    adapter_input_cast=false): the kernel runs (the memory plan counts on it) and gives torch's computation."""
    from peft import LoraConfig, get_peft_model

    from launcher import lora_dropout_kernel, modeling

    calls = []
    real = lora_dropout_kernel.forward_pass
    monkeypatch.setattr(lora_dropout_kernel, "forward_pass", lambda *a: calls.append(a[1].dtype) or real(*a))
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(512, 256, bias=False)).cuda().to(torch.bfloat16)
    net = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1, target_modules=["0"]))
    layer = net.base_model.model[0]
    assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT keeps adapters in float32
    modeling.feed_adapters_the_activations_as_they_are(net)
    modeling.add_adapter_outputs_inside_the_matmul(net, dropout_kernel=True, one_node=True)
    net.train()
    x = torch.randn(600, 512, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = net(x)
    # the kernel ran on the adapter cast to bf16, as autocast casts it, in one node with the base (lora_layer.py)
    assert calls == [torch.bfloat16] and out.dtype == torch.bfloat16 and out.shape == (600, 256)
    assert type(out.grad_fn.next_functions[0][0]).__name__ == "FrozenLinearWithLoraBackward"
    out.float().sum().backward()
    assert layer.lora_A["default"].weight.grad.dtype == torch.float32


@pytest.mark.parametrize("x_needs_grad, with_bias", [(True, False), (False, True)])
def test_one_node_with_the_kernels_dropout_equals_torch_with_its_mask(x_needs_grad, with_bias):
    """launcher/lora_layer.py with dropout on: the base GEMM, the kernel's forward and its backward adding the
    adapter's input gradient into the base's, against torch's separate ops on the kernel's mask; an input that
    needs no gradient (the first layer's, over frozen embeddings) and a frozen bias."""
    from launcher.lora_dropout_kernel import keep_mask
    from launcher.lora_layer import FrozenLinearWithLora

    torch.manual_seed(0)
    T, K, N, R, p, seed, scaling = 1000, 1536, 384, 16, 0.1, 99, 2.0
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16, requires_grad=x_needs_grad)
    weight = (torch.randn(N, K, device="cuda") / math.sqrt(K)).bfloat16()
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16) if with_bias else None
    lora_a = (torch.randn(R, K, device="cuda") / math.sqrt(K)).requires_grad_(True)  # float32, as under DDP
    lora_b = (torch.randn(N, R, device="cuda") / 4).requires_grad_(True)
    keep = keep_mask(x, p, seed)
    out = FrozenLinearWithLora.apply(x, weight, bias, lora_a, lora_b, scaling, p, seed)
    grad = torch.randn_like(out)
    out.backward(grad)
    x_ref, a_ref, b_ref = (t.detach().clone().requires_grad_(True) for t in (x, lora_a, lora_b))
    adapter = reference(x_ref, a_ref, keep, p) @ b_ref.bfloat16().t() * scaling
    ref = torch.nn.functional.linear(x_ref, weight, bias) + adapter
    ref.backward(grad)
    assert out.dtype == torch.bfloat16 and lora_a.grad.dtype == lora_b.grad.dtype == torch.float32
    for ours, theirs in ((out, ref), (lora_a.grad, a_ref.grad), (lora_b.grad, b_ref.grad)):
        assert rel_err(ours, theirs) < 1e-2
    assert rel_err(x.grad, x_ref.grad) < 1e-2 if x_needs_grad else x.grad is None


@pytest.mark.parametrize("K, N, rank", [(1536, 256, 16), (8960, 1536, 16), (200, 300, 8)])
def test_one_node_without_dropout_equals_torch(K, N, rank):
    """launcher/lora_layer.py with p 0 (DPO: TRL turns dropout off): cuBLAS's lora_A product forward, and the
    kernel's backward without a mask adding the adapter's input gradient into the base's, against torch's ops."""
    from launcher.lora_layer import FrozenLinearWithLora

    torch.manual_seed(1)
    T, scaling = 1000, 2.0
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(N, K, device="cuda") / math.sqrt(K)).bfloat16()
    lora_a = (torch.randn(rank, K, device="cuda") / math.sqrt(K)).requires_grad_(True)
    lora_b = (torch.randn(N, rank, device="cuda") / 4).requires_grad_(True)
    out = FrozenLinearWithLora.apply(x, weight, None, lora_a, lora_b, scaling, 0.0, 0)
    grad = torch.randn_like(out)
    out.backward(grad)
    x_ref, a_ref, b_ref = (t.detach().clone().requires_grad_(True) for t in (x, lora_a, lora_b))
    ref = x_ref @ weight.t() + (x_ref @ a_ref.bfloat16().t()) @ b_ref.bfloat16().t() * scaling
    ref.backward(grad)
    for ours, theirs in ((out, ref), (x.grad, x_ref.grad), (lora_a.grad, a_ref.grad), (lora_b.grad, b_ref.grad)):
        assert rel_err(ours, theirs) < 1e-2


def test_a_peft_layer_without_dropout_runs_as_one_node_as_peft_computes_it():
    """DPO's case (TRL turns dropout off): modeling.py's forward with one_node takes the node at p 0, in training,
    and gives PEFT's output and gradients."""
    from peft import LoraConfig, get_peft_model

    from launcher import modeling

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(512, 256, bias=False)).cuda().to(torch.bfloat16)
    net = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["0"]))
    net.to(torch.bfloat16).train()
    layer = net.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    x = torch.randn(600, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    expected = net(x)
    expected.float().pow(2).sum().backward()
    want = [t.grad.clone() for t in (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight)]
    for t in (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight):
        t.grad = None
    modeling.add_adapter_outputs_inside_the_matmul(net, one_node=True)
    out = net(x)
    assert type(out.grad_fn.next_functions[0][0]).__name__ == "FrozenLinearWithLoraBackward"
    assert rel_err(out, expected) < 1e-2
    out.float().pow(2).sum().backward()
    got = [x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]
    for ours, theirs in zip(got, want):
        assert rel_err(ours, theirs) < 2e-2


def test_a_hooked_base_layer_takes_the_separate_ops_with_the_kernel(monkeypatch):
    """Where the one node would skip something calling the base layer runs (here a forward hook), the kernel
    still drops, through modeling.py's separate ops: the hook runs and the output is no FrozenLinearWithLora."""
    from peft import LoraConfig, get_peft_model

    from launcher import lora_dropout_kernel, modeling

    calls, hooked = [], []
    real = lora_dropout_kernel.forward_pass
    monkeypatch.setattr(lora_dropout_kernel, "forward_pass", lambda *a: calls.append(1) or real(*a))
    base = torch.nn.Sequential(torch.nn.Linear(512, 256, bias=False)).cuda().to(torch.bfloat16)
    net = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1, target_modules=["0"]))
    net.to(torch.bfloat16)
    layer = net.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # PEFT's zeros would give lora_A no gradient
    layer.base_layer.register_forward_hook(lambda *args: hooked.append(1))
    modeling.add_adapter_outputs_inside_the_matmul(net, dropout_kernel=True, one_node=True)
    net.train()
    x = torch.randn(600, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = net(x)
    assert calls == [1] and hooked == [1]
    assert "FrozenLinearWithLora" not in type(out.grad_fn.next_functions[0][0]).__name__
    out.float().sum().backward()
    assert x.grad.abs().sum() > 0 and layer.lora_A["default"].weight.grad.abs().sum() > 0
