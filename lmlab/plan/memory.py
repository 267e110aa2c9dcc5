"""Memory per GPU for training, as a breakdown, and the KV cache for inference.

Static memory per parameter (docs/rules.md §4: ~16-20 bytes/param for mixed-precision AdamW):
  bf16 weights 2 + bf16 grads 2 + fp32 master 4 + Adam moments 4 + 4 = 16 bytes.
  8-bit Adam keeps the moments in 1 byte each (10 bytes); Adafactor keeps no first
  moment and factored second moments (rows + cols per matrix, negligible): 8 bytes.
  Pure bf16 (no master copy, states in bf16): 2 + 2 + 4 = 8 bytes for AdamW.
Sharding over N GPUs (ZeRO, Rajbhandari et al. 2020; FSDP2 = ZeRO-3):
  ZeRO-1 shards optimizer state, ZeRO-2 also gradients, ZeRO-3 also weights;
  offload moves optimizer state (and, with ZeRO-3, weights) to CPU memory.
LoRA freezes the base (bf16, no gradients, no optimizer state) and trains the
adapters in fp32 with AdamW (16 bytes each). QLoRA stores the base linear weights
in NF4: 4 bits plus one fp32 absmax per 64 weights, itself quantised to 8 bits per
block with one fp32 constant per 256 blocks (double quantisation, Dettmers et al. 2023):
0.5 + 1/64 + 4/(64*256) bytes per weight; its paged optimizer lets the adapter states
page out to CPU (the QLoRA paper's 65B-on-48GB setting).

Activations were counted from the tensors HF Llama saves for backward (sdpa or
flash attention), per layer and token: 8h + 2*kv_dim + 4*ffn + heads + 2 elements;
eager attention also keeps the softmax, heads*seq per token. Outside the layers:
3h elements plus the logits, kept in fp32 for the loss. With gradient
checkpointing a layer keeps only its input (h) and one layer is recomputed at a time.

Model parallelism (sizing only: lmlab itself runs data parallelism through accelerate), as
Korthikanti et al. (2022) count it for Megatron: tensor parallelism over t GPUs splits
every matrix and the vocabulary t ways and, with sequence parallelism, every activation
too; a 1F1B pipeline of p stages gives each stage ceil(L/p) layers (the first the input
embedding, the last the head), and its first stage holds p micro-batches in flight, so
L layers' activations of one micro-batch, while the last holds its own layers and the
loss; context parallelism over c GPUs (ring attention) splits each sequence c ways.
ZeRO shards over the remaining data-parallel GPUs and the context-parallel ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from lmlab.plan.params import ModelShape, count_params

GB = 1e9
Method = Literal["full", "lora", "qlora"]
Optimizer = Literal["adamw", "adamw_8bit", "adafactor"]
Sharding = Literal["ddp", "zero1", "zero2", "zero3"]
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
OPTIMIZER_BYTES = {"adamw": 12.0, "adamw_8bit": 6.0, "adafactor": 4.0}  # fp32 master + states, per trained param
# each optimizer's HF Trainer `optim` name where it is not AdamW (what --emit writes and the dry run reads)
HF_OPTIMIZER = {"adamw_8bit": "adamw_bnb_8bit", "adafactor": "adafactor"}
# pure bf16 (no fp32 master copy; the states in bf16, 8-bit ones as they are): per trained param
PURE_BF16_OPTIMIZER_BYTES = {"adamw": 4.0, "adamw_8bit": 2.0, "adafactor": 0.0}
LORA_TARGETS = {
    "all-linear": ("q", "k", "v", "o", "gate", "up", "down"),
    "attention": ("q", "k", "v", "o"),
    "qv": ("q", "v"),
}


@dataclass(frozen=True)
class TrainSetup:
    method: Method = "full"
    optimizer: Optimizer = "adamw"
    sharding: Sharding = "ddp"
    num_gpus: int = 1
    offload: bool = False
    offload_params: bool = True  # under zero3 offload: the weight and gradient shards too (False: optimizer only)
    micro_batch: int = 1
    seq_len: int = 2048
    gradient_checkpointing: bool = False
    attention: Literal["sdpa", "flash", "eager"] = "flash"
    precision_bytes: int = 2  # bf16 weights and activations; 4 for fp32 training
    master_weights: bool = True  # bf16 with an fp32 master copy (mixed precision); False: pure bf16
    quant_bits: Literal[4, 8] = 4  # QLoRA's frozen base: NF4 with double quantisation, or LLM.int8
    lora_rank: int = 16
    lora_targets: str = "all-linear"
    paged_optimizer: bool = True  # QLoRA: bitsandbytes' paged AdamW pages its states to CPU under pressure
    # how the loss step holds the logits (loss_step_bytes): SFT / DPO / RL always tile them (TRL's fused head);
    # pretraining and CPT under train.tiled_loss: auto ("auto" here) only when a micro-batch's fp32 logits would
    # exceed one chunk, fused on CUDA with Triton, else lmlab's chunks; z-loss or tiled_loss: false: "off"
    loss_tiling: Literal["off", "chunks", "fused", "auto"] = "fused"
    triton: bool = True  # TRL's fused head runs its Triton kernel (CUDA); without it, a torch fallback
    tensor_parallel: int = 1  # t: every matrix, the vocabulary and (sequence parallel) the activations split t ways
    pipeline_parallel: int = 1  # p: 1F1B stages of ceil(L/p) layers
    context_parallel: int = 1  # c: each sequence split c ways (ring attention)

    @property
    def shard_group(self) -> int:
        """GPUs that hold the same parameters, over which ZeRO shards: data-parallel x context-parallel."""
        return max(1, self.num_gpus // (self.tensor_parallel * self.pipeline_parallel))

    @property
    def data_parallel(self) -> int:
        """Model replicas, each taking its own micro-batches."""
        return max(1, self.shard_group // self.context_parallel)


@dataclass
class MemoryBreakdown:
    """Bytes per GPU."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    trainable_params: int
    cpu_offloaded: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def as_gb(self) -> dict[str, float]:
        return {k: round(getattr(self, k) / GB, 3)
                for k in ("weights", "gradients", "optimizer", "activations", "total", "cpu_offloaded")}


def lora_matrix_params(d_in: int, d_out: int, rank: int) -> int:
    """LoRA on one d_in x d_out matrix: A is r x d_in, B is d_out x r (docs/rules.md §4: 4096^2 at r=16 -> 131,072)."""
    return rank * (d_in + d_out)


def lora_params(shape: ModelShape, rank: int, targets: str = "all-linear") -> int:
    """Adapter parameters of every targeted matrix (experts included for MoE)."""
    h, q, kv = shape.hidden_size, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    names = LORA_TARGETS.get(targets, tuple(t.strip().removesuffix("_proj") for t in targets.split(",")))
    dims = {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h)}
    per_layer = sum(lora_matrix_params(*dims[n], rank) for n in names if n in dims)
    mlp = [n for n in names if n in ("gate", "up", "down")]
    dense_layers = shape.num_layers - shape.moe_layers
    total = shape.num_layers * per_layer + dense_layers * len(mlp) * lora_matrix_params(h, shape.intermediate_size,
                                                                                       rank)
    if shape.is_moe:
        total += shape.moe_layers * shape.num_experts * len(mlp) * lora_matrix_params(
            h, shape.moe_intermediate_size, rank)
    return total


def activation_elements_per_token(shape: ModelShape, setup: TrainSetup) -> dict[str, float]:
    """Elements saved for backward per token: kept through the step, recomputed per layer, outside the layers."""
    h, q_dim = shape.hidden_size, shape.num_heads * shape.head_dim
    kv_dim = shape.num_kv_heads * shape.head_dim
    ffn = shape.intermediate_size
    if shape.is_moe:  # each token's activations pass through top-k experts
        ffn = shape.experts_per_token * shape.moe_intermediate_size + shape.shared_expert_intermediate_size
    per_layer = 7 * h + q_dim + 2 * kv_dim + 4 * ffn + shape.num_heads + 2
    if shape.qk_norm:  # RMSNorm on q and k keeps its input and its output
        per_layer += 2 * (q_dim + kv_dim)
    if setup.attention == "eager":
        per_layer += shape.num_heads * setup.seq_len + 2 * (q_dim - kv_dim)
    if setup.gradient_checkpointing:
        return {"kept": shape.num_layers * h, "recompute": per_layer, "outside": 3 * h}
    return {"kept": shape.num_layers * per_layer, "recompute": 0, "outside": 3 * h}


def activation_bytes(shape: ModelShape, setup: TrainSetup, include_recompute: bool = True) -> float:
    """Peak activation bytes; without the recompute term, only what the forward pass keeps (a tiled loss
    keeps nothing vocabulary-sized: it recomputes its tiles in the backward). Under model parallelism the
    busier of a pipeline's first stage (every layer's kept activations: p micro-batches of L/p layers) and
    its last (its own layers and the loss), each split by t and the sequence by c."""
    t, p = setup.tensor_parallel, setup.pipeline_parallel
    tokens = setup.micro_batch * setup.seq_len / setup.context_parallel
    parts = activation_elements_per_token(shape, setup)
    per_layer_kept = parts["kept"] / shape.num_layers
    outside = parts["outside"] + (parts["recompute"] if include_recompute else 0)
    if t > 1:
        shape = replace(shape, vocab_size=-(-shape.vocab_size // t))  # vocabulary-parallel head and loss
    tiling = resolved_tiling(setup, shape.vocab_size)
    if tiling == "off" or not include_recompute:
        loss = tokens * loss_bytes_per_token(shape, setup, peak=include_recompute) if tiling == "off" else 0.0
    else:
        loss = loss_step_bytes(shape.vocab_size, tokens, shape.hidden_size, setup.precision_bytes, tiling,
                               setup.triton)
    last = tokens * (per_layer_kept * -(-shape.num_layers // p) + outside) * setup.precision_bytes / t + loss
    if p == 1:
        return last
    first = tokens * (per_layer_kept * shape.num_layers + outside) * setup.precision_bytes / t
    return max(first, last)


def loss_bytes_per_token(shape: ModelShape, setup: TrainSetup, peak: bool = True) -> float:
    """The LM head and the loss, per token. Cross-entropy saves its fp32 log-softmax for backward (4 bytes
    per vocabulary entry, what the forward keeps); at the peak of the step the model's returned logits
    are alive too (fp32, plus the compute-dtype logits they were upcast from under bf16) and so is the
    log-softmax's fp32 gradient. In fp32 that is 12 bytes per entry, what transformers' default
    causal-LM loss was measured to peak at."""
    saved = 4
    if not peak:
        return shape.vocab_size * saved
    logits = 4 + (setup.precision_bytes if setup.precision_bytes != 4 else 0)
    return shape.vocab_size * (saved + logits + 4)


TILE_LOGITS_BYTES = 128 * 2**20  # lmlab's tiled loss: one chunk of fp32 logits (lmlab.models.tiled)


def logits_fit_one_chunk(tokens: int, vocab_size: int) -> bool:
    """Whether one micro-batch's fp32 logits fit in one chunk: then train.tiled_loss: auto does not tile (tiles
    would save nothing and cost a recomputation). lmlab.models.tiled and the planner both ask this."""
    return tokens * vocab_size * 4 <= TILE_LOGITS_BYTES


def tiling_choice(requested: bool | str, tokens: int, vocab_size: int, triton: bool) -> str:
    """train.tiled_loss decided: "off" when not requested (or, under "auto", when a micro-batch of `tokens` has
    logits that fit one chunk), else TRL's fused head where its Triton kernel runs and lmlab's chunks elsewhere.
    The packed stages (lmlab.models.tiled.tiling_for) and the planner (resolved_tiling) both decide here."""
    if not requested or (requested == "auto" and logits_fit_one_chunk(tokens, vocab_size)):
        return "off"
    return "fused" if triton else "chunks"


def resolved_tiling(setup: TrainSetup, vocab_size: int) -> str:
    """The setup's loss tiling with "auto" decided as the packed stages decide it."""
    if setup.loss_tiling != "auto":
        return setup.loss_tiling
    return tiling_choice("auto", setup.micro_batch * setup.seq_len, vocab_size, setup.triton)


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk of lmlab's tiled loss, so that one chunk's fp32 logits take TILE_LOGITS_BYTES."""
    return max(16, TILE_LOGITS_BYTES // (4 * vocab_size))
TRL_TILE = (4096, 32768)  # TRL's fused LM head: tokens x vocabulary entries per tile


def loss_step_bytes(vocab: int, tokens: int, hidden: int = 0, precision_bytes: int = 2, tiling: str = "off",
                    triton: bool = True) -> float:
    """Peak bytes of the LM head and the loss for one micro-batch of `tokens`, beyond the backbone's.

    off: the whole logits (loss_bytes_per_token). chunks (lmlab's checkpointed chunks): one chunk's fp32
    logits, its log-softmax and their gradient (2.9 copies) and most of one fp32 gradient of the head weight,
    a chunk's own while autograd adds it to the accumulated one (0.72 of it). Both constants are fitted to
    the eight measured cases; within one vocabulary the measured share still moves by about +-10% with the
    tokens (the backbone's own backward, which grows with them, overlaps part of the loss's peak).
    fused (TRL's head): one tile in the compute dtype plus fp32 gradients of the head weight and the
    hidden states; without Triton (CPU) its torch fallback holds about 33 bytes per tile entry in all
    (measured by benchmarks/loss_memory.py: more than the whole logits below 4k tokens). The constants
    come from the CPU measurements of benchmarks/loss_memory.py (benchmarks/results/loss_memory_cpu.txt);
    the Triton path's is the kernel's own allocation, not yet measured on a GPU."""
    if tiling == "off":
        return tokens * vocab * (12 + (precision_bytes if precision_bytes != 4 else 0))
    if tiling == "chunks":
        chunk = min(tokens, chunk_tokens(vocab))
        return 2.9 * chunk * vocab * 4 + 0.72 * vocab * hidden * 4
    tile = min(tokens, TRL_TILE[0]) * min(vocab, TRL_TILE[1])
    if not triton:
        return 33 * tile
    return tile * precision_bytes + (vocab + tokens) * hidden * 4


def int8_bytes(in_features: int) -> float:
    """LLM.int8 (bitsandbytes): one byte a weight and an fp32 absmax per output row (Dettmers et al. 2022)."""
    return 1 + 4 / in_features


def parameter_share(shape: ModelShape, setup: TrainSetup, counts) -> float:
    """The share of the model's parameters on the busiest GPU under tensor and pipeline parallelism: a stage's
    ceil(L/p) layers plus the larger of its ends (the input embedding, or the head and final norm), all split
    t ways. 1.0 without model parallelism."""
    t, p = setup.tensor_parallel, setup.pipeline_parallel
    if t == 1 and p == 1:
        return 1.0
    h, layers = shape.hidden_size, shape.num_layers
    per_layer = (counts.total - counts.embedding - h) / layers
    ends = counts.embedding + h if p == 1 else shape.vocab_size * h + h  # a tied matrix has a copy at each end
    return (-(-layers // p) * per_layer + ends) / t / counts.total


def model_states(shape: ModelShape, setup: TrainSetup, counts, notes: list[str]) -> tuple[int, float, float, float]:
    """(trained parameters, weight, gradient, optimizer bytes) before any sharding or offload; `counts` is
    count_params(shape), which training_memory has already made."""
    n, e = counts.total, setup.precision_bytes
    if setup.method == "full":
        if e == 4:  # fp32 weights are their own master
            states = n * (OPTIMIZER_BYTES[setup.optimizer] - 4)
        else:
            states = n * (OPTIMIZER_BYTES if setup.master_weights else PURE_BF16_OPTIMIZER_BYTES)[setup.optimizer]
        return n, n * e, n * e, states
    trainable = lora_params(shape, setup.lora_rank, setup.lora_targets)
    if setup.method == "qlora":
        linear = n - counts.embedding - shape.hidden_size * (2 * shape.num_layers + 1)
        per_weight = NF4_BYTES if setup.quant_bits == 4 else int8_bytes(shape.hidden_size)
        weights = linear * per_weight + (n - linear) * 2 + trainable * 4
        notes.append(("QLoRA: NF4 base with double quantisation" if setup.quant_bits == 4 else
                      "QLoRA: LLM.int8 base") + ", bf16 compute; needs CUDA (bitsandbytes)")
    else:
        weights = n * e + trainable * 4
    # fp32 adapters are their own master: the optimizer's states only
    return trainable, weights, trainable * 4, trainable * (OPTIMIZER_BYTES[setup.optimizer] - 4)


def training_memory(shape: ModelShape, setup: TrainSetup) -> MemoryBreakdown:
    counts = count_params(shape)
    e, shards = setup.precision_bytes, setup.shard_group
    notes: list[str] = []
    share = parameter_share(shape, setup, counts)
    trainable, weights, grads, master_and_states = (x * share for x in model_states(shape, setup, counts, notes))
    trainable = round(trainable)
    optimizer = master_and_states
    offloaded = 0.0
    if setup.sharding in ("zero1", "zero2", "zero3"):
        optimizer /= shards
    if setup.sharding in ("zero2", "zero3"):
        grads /= shards
    weight_shards = weights
    if setup.sharding == "zero3":
        # one FSDP unit per decoder layer: one gathered for compute, the next prefetched; the root unit
        # (embeddings, head, final norm) stays gathered from its forward to its backward
        largest_layer = counts.per_layer_attention + counts.per_layer_mlp_total
        root = counts.embedding + shape.hidden_size
        gathered = (2 * largest_layer + root) * e / setup.tensor_parallel
        weight_shards = weights / shards
        weights = weight_shards + gathered
    if setup.method == "qlora" and setup.paged_optimizer and not setup.offload:
        offloaded += optimizer
        optimizer = 0.0
        notes.append("paged AdamW: adapter optimizer states page to CPU memory when the GPU runs short")
    if setup.offload:
        offloaded += optimizer * setup.num_gpus if setup.sharding != "ddp" else optimizer
        optimizer = 0.0
        if setup.sharding == "zero3":
            # the optimizer step runs on the CPU, so the gradient shards go there (ZeRO-Offload): the GPU keeps
            # a gathered unit's gradients until they are reduce-scattered; with offload_params (FSDP2's CPU
            # offload, DeepSpeed's offload_param) the weight shards live in CPU memory too
            offloaded += grads * setup.num_gpus
            grads = gathered
            if setup.offload_params:
                offloaded += weight_shards * setup.num_gpus
                weights -= weight_shards
        notes.append(f"CPU offload: optimizer step on CPU, expect 2-5x slower steps; {offloaded / GB:,.0f} GB of "
                     "CPU memory across the nodes (check the hosts have it)")
    return MemoryBreakdown(weights=weights, gradients=grads, optimizer=optimizer,
                           activations=activation_bytes(shape, setup), trainable_params=trainable,
                           cpu_offloaded=offloaded, notes=notes)


def kv_cache_bytes(shape: ModelShape, seq_len: int, batch: int = 1, bytes_per_value: int = 2) -> float:
    """docs/rules.md §3: 2 (K and V) * bytes * seq * layers * kv_heads * head_dim, per sequence."""
    return 2 * bytes_per_value * seq_len * shape.num_layers * shape.num_kv_heads * shape.head_dim * batch
