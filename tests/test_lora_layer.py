"""launcher/lora_layer.py on the CPU: the one autograd node for a LoRA linear against the separate ops, and when it
takes a layer. With dropout on (the kernel, CUDA only): tests/test_lora_dropout_kernel.py."""
import types

import pytest
import torch

from launcher.lora_layer import FrozenLinearWithLora, takes


def separate_ops(x, weight, bias, lora_a, lora_b, scaling):
    return torch.nn.functional.linear(x, weight, bias) + (x @ lora_a.t()) @ lora_b.t() * scaling


@pytest.mark.parametrize("with_bias", [False, True])
def test_one_node_gives_the_output_and_gradients_of_the_separate_ops(with_bias):
    torch.manual_seed(0)
    T, K, N, R = 37, 24, 40, 4
    weight, lora_a, lora_b = torch.randn(N, K), torch.randn(R, K), torch.randn(N, R)
    bias = torch.randn(N) if with_bias else None
    grad = torch.randn(N, T).t()  # not contiguous, as a transposed gradient can be
    results = []
    for one_node in (False, True):
        x = torch.randn(T, K, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        a, b = lora_a.clone().requires_grad_(True), lora_b.clone().requires_grad_(True)
        args = (x, weight, bias, a, b, 0.5)
        out = FrozenLinearWithLora.apply(*args, 0.0, 0) if one_node else separate_ops(*args)
        out.backward(grad)
        results.append((out.detach(), x.grad, a.grad, b.grad))
    for name, ours, theirs in zip(("output", "x grad", "lora_A grad", "lora_B grad"), results[1], results[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=name)
    assert results[1][1].abs().sum() > 0 and results[1][2].abs().sum() > 0


def test_one_node_returns_adapter_gradients_in_their_own_dtype_and_none_where_not_needed():
    """bf16 activations and base, float32 adapters (DDP's): the product in bf16, the adapters' gradients float32;
    an input that needs no gradient (the first layer's, over frozen embeddings) gets none computed."""
    torch.manual_seed(0)
    x = torch.randn(16, 8, dtype=torch.bfloat16)
    weight = torch.randn(12, 8, dtype=torch.bfloat16)
    a, b = torch.randn(4, 8, requires_grad=True), torch.randn(12, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = FrozenLinearWithLora.apply(x, weight, None, a, b, 2.0, 0.0, 0)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert a.grad.dtype == b.grad.dtype == torch.float32 and x.grad is None
    expected = separate_ops(x.float(), weight.float(), None, a.detach().bfloat16().float(), b.detach().bfloat16().float(), 2.0)
    assert ((out.float() - expected).norm() / expected.norm()).item() < 1e-2  # bf16's rounding, no more


def test_takes_only_a_plain_frozen_linear_in_the_matmuls_dtype():
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    a, b = torch.randn(2, 8), torch.randn(4, 2)

    def frozen(dtype=torch.float32):
        base = torch.nn.Linear(8, 4).to(dtype)
        base.requires_grad_(False)
        return base

    assert takes(frozen(), x, a, b)
    trainable = torch.nn.Linear(8, 4)
    assert not takes(trainable, x, a, b)  # a full fine-tune's base needs its own gradient
    patched = frozen()
    patched.forward = types.MethodType(lambda self, inp: inp, patched)  # as fp8_linear switches a layer's forward
    assert not takes(patched, x, a, b)
    hooked = frozen()
    hooked.register_forward_pre_hook(lambda mod, args: None)
    assert not takes(hooked, x, a, b)
    assert not takes(frozen(torch.bfloat16), x, a, b)  # base and input in different dtypes
    assert not takes(frozen(), x, a.double(), b)  # no autocast: adapters in another dtype would be promoted
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert takes(frozen(torch.bfloat16), x.bfloat16(), a, b)  # autocast casts float32 adapters to bf16
        assert not takes(frozen(), x, a, b)  # autocast would run a float32 base in bf16
