"""launcher/lora_layer.py on the CPU: which layers the one autograd node takes. Its computation (the dropout kernel:
CUDA only) against torch's separate ops: tests/test_lora_dropout_kernel.py."""
import types

import torch

from launcher.lora_layer import takes


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
    trained_bias = frozen()
    trained_bias.bias.requires_grad_(True)
    assert not takes(trained_bias, x, a, b)
    patched = frozen()
    patched.forward = types.MethodType(lambda self, inp: inp, patched)  # as fp8_linear switches a layer's forward
    assert not takes(patched, x, a, b)
    for hook in ("register_forward_pre_hook", "register_forward_hook", "register_full_backward_hook"):
        hooked = frozen()
        getattr(hooked, hook)(lambda *args: None)  # the one node calls F.linear: the hook would not run
        assert not takes(hooked, x, a, b), hook
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)  # on every module
    try:
        assert not takes(frozen(), x, a, b)
    finally:
        handle.remove()
    assert not takes(frozen(torch.bfloat16), x, a, b)  # base and input in different dtypes
    assert not takes(frozen(), x, a.double(), b)  # no autocast: adapters in another dtype would be promoted
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert takes(frozen(torch.bfloat16), x.bfloat16(), a, b)  # autocast casts float32 adapters to bf16
        assert not takes(frozen(), x, a, b)  # autocast would run a float32 base in bf16
