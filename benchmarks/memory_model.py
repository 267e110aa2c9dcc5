"""Predicted vs measured training memory for tiny models on CPU (fp32), as ratios.

Static memory (weights, gradients, AdamW moments) is measured from the tensors
themselves and must match the planner exactly. Activation memory is measured as
the bytes of the tensors autograd saves for backward (one forward pass, counted
by storage so views are not double-counted); the planner's estimate of what the
forward keeps must be within +-25%. (With gradient checkpointing the planner also
adds one recomputed layer to the peak; that part happens during backward and is
not in this count.) LoRA rows check the adapter parameter count against peft.

    python benchmarks/memory_model.py

It then measures the loss step on its own (benchmarks/loss_memory.py: vocabularies of 32k-256k,
1k-8k tokens, whole logits and both tiled ways, peak RSS in fresh processes) against the
planner's loss_step_bytes (target 0.9-1.1).

On a CUDA machine it also trains one step of a ~125M Llama (bf16 autocast over fp32
weights, as the HF Trainer does: 16 bytes per parameter like the planner's mixed
precision) under full fine-tuning and LoRA, and prints torch.cuda.max_memory_allocated
against the planner's total (target +-10%).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

from lmlab.plan.memory import TrainSetup, activation_bytes, lora_params, training_memory
from lmlab.plan.params import shape_from_config

CASES = [
    dict(name="llama-gqa", model_type="llama", hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
         num_key_value_heads=2, intermediate_size=384, vocab_size=2048, tie_word_embeddings=True),
    dict(name="llama-mha-untied", model_type="llama", hidden_size=96, num_hidden_layers=3, num_attention_heads=6,
         num_key_value_heads=6, intermediate_size=256, vocab_size=1000, tie_word_embeddings=False),
    dict(name="llama-mqa-wide", model_type="llama", hidden_size=256, num_hidden_layers=2, num_attention_heads=8,
         num_key_value_heads=1, intermediate_size=1024, vocab_size=4096, tie_word_embeddings=True),
    dict(name="qwen3", model_type="qwen3", hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
         num_key_value_heads=2, head_dim=32, intermediate_size=384, vocab_size=2048, tie_word_embeddings=True),
]
SETTINGS = [dict(seq_len=256, micro_batch=4, attention="sdpa"), dict(seq_len=128, micro_batch=2, attention="eager"),
            dict(seq_len=256, micro_batch=4, attention="sdpa", gradient_checkpointing=True)]


def build(case: dict, attention: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in case.items() if k != "name"}
    config = AutoConfig.for_model(**kwargs, max_position_embeddings=1024, use_cache=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention), config


def saved_activation_bytes(model, batch: torch.Tensor) -> int:
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    return sum(seen.values())


def measure(case: dict, setting: dict) -> dict[str, float]:
    model, config = build(case, setting["attention"])
    if setting.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = torch.randint(0, config.vocab_size, (setting["micro_batch"], setting["seq_len"]))
    activations = saved_activation_bytes(model, batch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    moments = sum(v.numel() * v.element_size() for state in opt.state.values()
                  for k, v in state.items() if k in ("exp_avg", "exp_avg_sq"))
    shape = shape_from_config(config.to_dict())
    setup = TrainSetup(precision_bytes=4, micro_batch=setting["micro_batch"], seq_len=setting["seq_len"],
                       attention=setting["attention"], gradient_checkpointing=bool(setting.get("gradient_checkpointing")),
                       loss_tiling="off")  # the model's own loss (the loss step's tiles: benchmarks/loss_memory.py)
    predicted = training_memory(shape, setup)
    # the forward pass's saved tensors are what a checkpointed run keeps; the recomputed layer comes later
    kept = activation_bytes(shape, setup, include_recompute=False)
    return {"weights": predicted.weights / weights, "grads": predicted.gradients / grads,
            "optimizer": predicted.optimizer / moments, "activations": kept / activations}


def lora_ratio(case: dict, rank: int = 8) -> float:
    from peft import LoraConfig, get_peft_model

    model, config = build(case, "sdpa")
    peft_model = get_peft_model(model, LoraConfig(r=rank, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return lora_params(shape_from_config(config.to_dict()), rank, "all-linear") / trainable


GPU_CASE = dict(name="llama-125m", model_type="llama", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                num_key_value_heads=4, intermediate_size=2048, vocab_size=32000, tie_word_embeddings=True)


def gpu_peak_ratio(method: str, micro_batch: int = 8, seq_len: int = 1024) -> float:
    """Planner total / measured peak for one optimizer step on the GPU (full or LoRA r=16)."""
    model, config = build(GPU_CASE, "sdpa")
    model = model.cuda()
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
    torch.cuda.reset_peak_memory_stats()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    batch = torch.randint(0, config.vocab_size, (micro_batch, seq_len), device="cuda")
    for _ in range(2):  # the second step has the optimizer states allocated
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    measured = torch.cuda.max_memory_allocated()
    setup = TrainSetup(method=method, precision_bytes=2, micro_batch=micro_batch, seq_len=seq_len, attention="sdpa",
                       lora_rank=16, loss_tiling="off")
    predicted = training_memory(shape_from_config(config.to_dict()), setup).total
    print(f"gpu {GPU_CASE['name']}/{method}: predicted {predicted / 2**30:.2f} GiB, measured {measured / 2**30:.2f} GiB")
    del model, opt
    torch.cuda.empty_cache()
    return predicted / measured


def main() -> None:
    static, activation = [], []
    for case in CASES:
        for setting in SETTINGS:
            ratios = measure(case, setting)
            label = f"{case['name']}/{setting['attention']}" + ("+ckpt" if setting.get("gradient_checkpointing") else "")
            print(f"{label}: weights {ratios['weights']:.4f} grads {ratios['grads']:.4f} "
                  f"optimizer {ratios['optimizer']:.4f} activations {ratios['activations']:.3f}")
            static += [ratios["weights"], ratios["grads"], ratios["optimizer"]]
            activation.append(ratios["activations"])
        print(f"{case['name']}/lora-r8 trainable params predicted/peft: {lora_ratio(case):.4f}")
    print(f"static_ratio_min: {min(static):.4f}")
    print(f"static_ratio_max: {max(static):.4f}")
    print(f"activation_ratio_min: {min(activation):.3f}")
    print(f"activation_ratio_max: {max(activation):.3f}")
    print(f"activation_ratio_median: {statistics.median(activation):.3f}")
    if torch.cuda.is_available():
        print(f"gpu_full_ratio: {gpu_peak_ratio('full'):.3f}")
        print(f"gpu_lora_ratio: {gpu_peak_ratio('lora'):.3f}")
    sys.path.insert(0, str(Path(__file__).parent))
    from loss_memory import loss_cases

    _, loss_ratios = loss_cases()
    print(f"loss_step_within_10pct: {sum(0.9 <= r <= 1.1 for r in loss_ratios)}/{len(loss_ratios)}")
    print(f"activation_within_25pct: {sum(0.75 <= r <= 1.25 for r in activation)}/{len(activation)}")


if __name__ == "__main__":
    main()
