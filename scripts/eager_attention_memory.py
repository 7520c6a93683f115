"""What eager attention adds to a training step's peak GPU memory, per attention score (one head, one query, one
key), against SDPA: the constants of launcher/memory.py's EAGER_SCORE_BYTES and EAGER_SCORE_BYTES_TRANSIENT.
Random-init Gemma 2 (tanh logit cap) and Llama (no cap) models, 4 layers, bf16, frozen weights with input gradients
(as LoRA trains), one forward and backward of 2 rows of L tokens, with and without gradient checkpointing.
    python3 scripts/eager_attention_memory.py        (a CUDA GPU)
"""
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

LAYERS, HEADS, ROWS = 4, 8, 2
print(torch.__version__, torch.cuda.get_device_name(), flush=True)


def build(arch: str, attention: str):
    dims = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                num_key_value_heads=4, head_dim=256, vocab_size=32000, attn_implementation=attention)
    if arch == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**dims, sliding_window=4096))
    else:
        model = LlamaForCausalLM(LlamaConfig(**dims))
    model = model.to("cuda", torch.bfloat16).train().requires_grad_(False)
    model.enable_input_require_grads()
    return model


def peak_gib_of_a_step(model, length: int, checkpointing: bool) -> int:
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 32000, (ROWS, length), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model(ids, labels=ids, use_cache=False).loss.backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


print("| model | checkpointing | L | eager GiB | sdpa GiB | extra bytes per score (all layers) | per layer |")
print("|---|---|---|---|---|---|---|")
for arch in ("gemma2", "llama"):
    for checkpointing in (False, True):
        for length in (1024, 2048):
            peaks = {}
            for attention in ("eager", "sdpa"):
                torch.manual_seed(0)
                model = build(arch, attention)
                peaks[attention] = peak_gib_of_a_step(model, length, checkpointing)
                del model
                torch.cuda.empty_cache()
            per_score = (peaks["eager"] - peaks["sdpa"]) / (ROWS * HEADS * length**2)
            print(f"| {arch} | {checkpointing} | {length} | {peaks['eager'] / 2**30:.3f} | {peaks['sdpa'] / 2**30:.3f} "
                  f"| {per_score:.2f} | {per_score / (1 if checkpointing else LAYERS):.2f} |", flush=True)
