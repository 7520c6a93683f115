"""Gemma 2's capped attention under flex attention against eager (what the launcher runs for it): the outputs and
gradients over padded rows, then the time and peak memory of a training step's forward and backward at 2048
tokens (SDPA, which leaves the cap out, for the bound). Random-init models, bf16. A cap of 50 hardly binds on a
random-init model's small logits: part 1 shows the outputs agree, not that the cap is kept (docs/benchmarks.md,
2026-12-03 afternoon, has a forward with a binding cap).
    python3 scripts/flex_attention_check.py        (a CUDA GPU)
"""
import time

import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

print(torch.__version__, torch.cuda.get_device_name(), flush=True)


def build(attention: str, **dims):
    torch.manual_seed(0)
    config = Gemma2Config(**dims, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096,
                          attn_implementation=attention)
    return Gemma2ForCausalLM(config).to("cuda", torch.bfloat16).train()


# 1. The same outputs and gradients over padded rows (right padding, as TRL's collators pad)
small = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, vocab_size=1000)
ids = torch.randint(0, 1000, (4, 300), device="cuda")
mask = torch.ones_like(ids)
for row, real in enumerate((300, 211, 64, 7)):
    mask[row, real:] = 0
results = {}
for attention in ("eager", "flex_attention", "sdpa"):
    model = build(attention, **small)
    out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False)
    out.loss.backward()
    results[attention] = (out.logits.float()[mask.bool()], model.model.layers[0].self_attn.q_proj.weight.grad.float())
for attention in ("flex_attention", "sdpa"):
    (logits, grad), (ref_logits, ref_grad) = results[attention], results["eager"]
    print(f"{attention} against eager, real tokens: logits max |diff| {(logits - ref_logits).abs().max():.4f} "
          f"(of max |logit| {ref_logits.abs().max():.2f}); q_proj grad relative error "
          f"{(grad - ref_grad).norm() / ref_grad.norm():.4f}", flush=True)

# 2. A training step's forward and backward: 4 layers of Gemma-2-2B's width, 4 rows of 2048 tokens
wide = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, head_dim=256, vocab_size=32000)
print("| attention | first step s (compile) | fwd+bwd ms | peak GiB |", flush=True)
print("|---|---|---|---|", flush=True)
for attention in ("eager", "flex_attention", "sdpa"):
    model = build(attention, **wide).requires_grad_(False)
    model.enable_input_require_grads()
    steps = []
    for step in range(6):
        length = 2048 - 64 * (step % 3)  # padded batches vary in length
        batch = torch.randint(0, 32000, (4, length), device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        model(batch, labels=batch, use_cache=False).loss.backward()
        torch.cuda.synchronize()
        steps.append(time.perf_counter() - start)
    print(f"| {attention} | {steps[0]:.1f} | {1000 * sorted(steps[3:])[1]:.1f} | "
          f"{torch.cuda.max_memory_allocated() / 2**30:.2f} |", flush=True)
    del model
    torch.cuda.empty_cache()
