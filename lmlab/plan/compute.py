"""Training FLOPs and wall time at an assumed model-FLOPs utilisation (MFU)."""

from __future__ import annotations

from lmlab.plan.params import ModelShape

DEFAULT_MFU = 0.40  # a well-tuned dense run on modern GPUs reaches 35-50%; printed with every estimate


def flops_per_token(active_params: int, shape: ModelShape, seq_len: int) -> float:
    """6N for the weight matmuls (forward + backward) plus the attention scores, 12 * layers * (heads *
    head_dim) * seq (PaLM, appendix B). N leaves out the input embedding, a lookup with no matmul; a tied
    matrix is counted once, as the head it also is. The attention term is the full square, the convention
    of PaLM, nanochat and torchtitan whose MFU figures the planner assumes; a causal kernel does about half
    of it, which shows as a higher MFU, not as fewer FLOPs."""
    matmul_params = active_params - (0 if shape.tie_embeddings else shape.vocab_size * shape.hidden_size)
    return 6 * matmul_params + 12 * shape.num_layers * shape.num_heads * shape.head_dim * seq_len


def training_seconds(tokens: float, flops_token: float, num_gpus: int, tflops_per_gpu: float,
                     mfu: float = DEFAULT_MFU) -> float:
    return tokens * flops_token / (num_gpus * tflops_per_gpu * 1e12 * mfu)


def human_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
