"""Training FLOPs and wall time at an assumed model-FLOPs utilisation (MFU)."""

from __future__ import annotations

from dataclasses import dataclass

from lmlab.plan.params import ModelShape

DEFAULT_MFU = 0.40  # where no run was measured: a well-tuned dense run on modern GPUs reaches 35-50%


@dataclass(frozen=True)
class MfuAnchor:
    """MFU measured on a card class by a published run, recomputed with lmlab's FLOPs count (flops_per_token)."""

    eager: float
    compiled: float
    source: str


# torchtitan's Llama-3.1-8B on 8 x H100 SXM (bf16, FSDP, seq 8192): 5,762 tokens/s per GPU eager and 6,667
# compiled; at lmlab's 57.9 GFLOPs a token that is 333.6 and 386.0 TFLOPS of 989. nanochat's d32 reports 50.9%
# on the same cards with its own kernels (FlashAttention-3, Muon): a ceiling, not what HF models reach
_TORCHTITAN_H100 = ("torchtitan, Llama-3.1-8B on 8 x H100 SXM, bf16 FSDP, seq 8192: 5,762 tokens/s/GPU eager, "
                    "6,667 compiled, by lmlab's FLOPs count")
MFU_ANCHORS = {
    "H100 SXM 80GB": MfuAnchor(0.337, 0.390, _TORCHTITAN_H100),
    "H200 141GB": MfuAnchor(0.337, 0.390, "the H100's anchor (the same tensor cores and peak): " + _TORCHTITAN_H100),
}
COMPILED_STAGES = ("pretrain", "cpt")  # train.compile: auto compiles packed rows on CUDA (lmlab.stages.speed)


def stage_mfu(gpu_name: str, stage: str, given: float | None) -> tuple[float, str]:
    """The MFU a stage's time assumes and where it comes from: the user's figure, else the card class's measured
    anchor (compiled for the stages lmlab compiles, eager for the rest), else DEFAULT_MFU, said to be assumed."""
    if given is not None:
        return given, "given with --mfu"
    anchor = MFU_ANCHORS.get(gpu_name)
    if anchor is None:
        return DEFAULT_MFU, (f"no measured run on {gpu_name} in lmlab's table: {DEFAULT_MFU:.0%} assumed "
                             "(well-tuned dense runs reach 35-50%; give --mfu)")
    compiled = stage in COMPILED_STAGES
    return (anchor.compiled if compiled else anchor.eager), f"{'compiled' if compiled else 'eager'}: {anchor.source}"


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


def communication_seconds(setup, trainable_params: int, total_params: int, optimizer_steps: float, grad_accum: int,
                          busbw_gbps: float) -> float:
    """Seconds a stage's collectives take at an all-reduce bus bandwidth of `busbw_gbps` (NCCL's busbw, which
    already counts the ring's 2(n-1)/n), bf16 payloads, in all-reduce equivalents (a reduce-scatter or an
    all-gather moves half an all-reduce's traffic). Per optimizer step: DDP all-reduces the trained gradients
    once (accumulation skips the sync until the last micro-batch); ZeRO-1 reduce-scatters them and gathers
    the updated weights (one all-reduce in all); ZeRO-2 reduce-scatters every micro-batch's gradients (its
    shards are where they accumulate), then gathers the weights; ZeRO-3 gathers every weight for each
    micro-batch's forward and again for its backward (a third time when checkpointing recomputes the
    forward) and reduce-scatters each micro-batch's gradients. LoRA's gradients are the adapters' only."""
    if setup.shard_group == 1:
        return 0.0
    grads, weights = 2 * trainable_params / 1e9, 2 * total_params / 1e9  # GB of one full payload
    if setup.sharding in ("ddp", "zero1"):
        all_reduces = grads
    elif setup.sharding == "zero2":
        all_reduces = 0.5 * grads * grad_accum + 0.5 * weights
    else:
        gathers = 3 if setup.gradient_checkpointing else 2
        all_reduces = grad_accum * (0.5 * gathers * weights + 0.5 * grads)
    return optimizer_steps * all_reduces / busbw_gbps


def model_parallel_seconds(setup, shape: ModelShape, tokens: float, tp_busbw: float | None,
                           busbw: float | None) -> tuple[float, float]:
    """(seconds added to the compute, seconds overlapped with it) of model parallelism for a stage of `tokens`,
    on the busiest GPU. The 1F1B pipeline's bubble idles (p - 1) / m of the compute time for m micro-batches a
    step (Narayanan et al. 2021): returned as a factor by pipeline_bubble, not here. Tensor parallelism with
    sequence parallelism all-gathers and reduce-scatters each layer's activations twice in the forward and twice
    in the backward (twice more when checkpointing recomputes the forward), on the critical path; pipeline stages
    pass activations forward and gradients back; ring attention passes each layer's K and V around the c GPUs
    in the forward and K, V and their gradients in the backward, overlapped with the attention."""
    t, p, c = setup.tensor_parallel, setup.pipeline_parallel, setup.context_parallel
    local = tokens / (setup.data_parallel * c)  # tokens that pass through one GPU's layers
    layers = -(-shape.num_layers // p)
    e = setup.precision_bytes
    critical = overlapped = 0.0
    if t > 1 and tp_busbw:
        all_reduces = 6 if setup.gradient_checkpointing else 4
        critical += local * layers * all_reduces * shape.hidden_size * e / (tp_busbw * 1e9)
    if p > 1 and busbw:
        critical += 2 * local * shape.hidden_size * e / (busbw * 1e9)
    if c > 1 and busbw:
        kv = 2 * shape.num_kv_heads * shape.head_dim * local / t * e
        overlapped += 3 * (c - 1) * layers * kv / (busbw * 1e9)
    return critical, overlapped


def pipeline_bubble(setup, grad_accum: int) -> float:
    """The 1F1B schedule's idle share relative to the compute: (p - 1) / m, m micro-batches per step."""
    return (setup.pipeline_parallel - 1) / max(1, grad_accum)


# RL samples its completions with HF generate (TRL without vLLM, as lmlab's rl stage runs). A decoding step is
# memory-bound at small batches and generate adds per-step overhead: Llama-2-7B in bf16 at batch 1 decodes about
# 30 tokens/s on an A100-80GB where its 2,039 GB/s would allow 151, so about a fifth of the bandwidth bound
GENERATION_BANDWIDTH_SHARE = 0.2
RL_COMPLETION_SHARE = 0.5  # of an RL stage's tokens, the sampled completions (the rest are the prompts)


def generation_seconds(completion_tokens: float, weight_bytes: float, active_params: int, sequences_per_gpu: int,
                       num_gpus: int, bandwidth_gbs: float, tflops_per_gpu: float, mfu: float) -> float:
    """Decoding RL's completions: each step extends `sequences_per_gpu` sequences on every GPU by one token and
    reads every weight once (memory-bound, at GENERATION_BANDWIDTH_SHARE of the card's bandwidth), or does 2
    FLOPs per active parameter per sequence (compute-bound, at the MFU), whichever takes longer."""
    steps = completion_tokens / (num_gpus * sequences_per_gpu)
    memory_bound = weight_bytes / (bandwidth_gbs * 1e9 * GENERATION_BANDWIDTH_SHARE)
    compute_bound = 2 * active_params * sequences_per_gpu / (tflops_per_gpu * 1e12 * mfu)
    return steps * max(memory_bound, compute_bound)


def human_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
