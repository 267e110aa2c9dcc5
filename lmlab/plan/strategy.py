"""Pick the simplest parallel strategy that fits, and the micro-batch / accumulation to reach the batch.

Order of preference (simplest first, docs/rules.md §4): DDP, ZeRO-2, ZeRO-3 (FSDP2),
ZeRO-3 with CPU offload, then for fine-tuning LoRA and QLoRA. A strategy is recommended
when its total memory stays under 70% of the GPU (30% headroom for fragmentation,
allocator caches and spikes). When no strategy is, the first that fits the whole card is
still planned, marked tight: a setup that fits is never refused (the QLoRA paper's 65B on
one 48 GB card is the classic case), and the user is told what the headroom was for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from lmlab.plan.hardware import Accelerator, nodes_for
from lmlab.plan.memory import GB, MemoryBreakdown, TrainSetup, training_memory
from lmlab.plan.params import ModelShape

HEADROOM = 0.30


@dataclass
class Choice:
    name: str
    setup: TrainSetup
    memory: MemoryBreakdown
    grad_accum: int
    global_batch: int  # sequences per optimizer step = micro x accum x data-parallel replicas
    within_headroom: bool = True  # False: fits the whole card, not the recommended 70% of it


CANDIDATES = [
    ("DDP", dict(method="full", sharding="ddp")),
    ("ZeRO-2", dict(method="full", sharding="zero2")),
    ("ZeRO-3 / FSDP2", dict(method="full", sharding="zero3")),
    ("ZeRO-3 + optimizer offload", dict(method="full", sharding="zero3", offload=True, offload_params=False)),
    ("ZeRO-3 + CPU offload", dict(method="full", sharding="zero3", offload=True)),
    ("LoRA", dict(method="lora", sharding="ddp")),
    ("QLoRA", dict(method="qlora", sharding="ddp")),
]
# planned only when asked for (--sharding zero1): ZeRO-2 saves more at the same communication
ON_REQUEST = [("ZeRO-1", dict(method="full", sharding="zero1"))]


@dataclass(frozen=True)
class Forced:
    """What the user fixed instead of letting the planner choose (`lmlab plan --sharding/--micro-batch/
    --checkpointing`); None leaves it to the planner."""

    sharding: str | None = None
    micro_batch: int | None = None
    checkpointing: bool | None = None

    def candidates(self) -> list[tuple[str, dict]]:
        if self.sharding is None:
            return CANDIDATES
        chosen = []
        full = [c for c in CANDIDATES if c[1]["method"] == "full"]
        for name, overrides in full + ON_REQUEST + [c for c in CANDIDATES if c[1]["method"] != "full"]:
            if overrides["method"] != "full" and self.sharding != "ddp":  # adapters under the asked sharding
                chosen.append((f"{name} + {self.sharding.upper().replace('ZERO', 'ZeRO-')}",
                               {**overrides, "sharding": self.sharding}))
            elif overrides["sharding"] == self.sharding:
                chosen.append((name, overrides))
        return chosen


def budget_bytes(gpu: Accelerator, headroom: float = HEADROOM) -> float:
    return gpu.memory_gb * GB * (1 - headroom)


def _best_micro_batch(shape: ModelShape, base: TrainSetup, budget: float, max_micro: int,
                      checkpointing: tuple[bool, ...] = (False, True), only: bool = False
                      ) -> tuple[TrainSetup, MemoryBreakdown] | None:
    """Largest power-of-two micro-batch within `budget` bytes, first without then with gradient checkpointing,
    with its memory; `only`: max_micro itself or nothing."""
    for checkpointing in checkpointing:
        micro = max_micro
        while micro >= (max_micro if only else 1):
            setup = replace(base, micro_batch=micro, gradient_checkpointing=checkpointing)
            memory = training_memory(shape, setup)
            if memory.total <= budget:
                return setup, memory
            micro //= 2
    return None


def choose_strategy(shape: ModelShape, gpu: Accelerator, num_gpus: int, seq_len: int, global_batch: int,
                    allow_adapters: bool, base: TrainSetup | None = None, method: str | None = None,
                    host_ram: float | None = None, forced: Forced = Forced()) -> Choice | None:
    """The first candidate within the recommended headroom; else the first that fits the whole card, marked
    `within_headroom=False`; None when nothing fits at all (see `what_would_fit`). With `host_ram` (bytes of CPU
    memory per node, hardware.GPUS_PER_NODE GPUs to a node), a candidate that offloads more than the nodes hold is skipped."""
    nodes = nodes_for(num_gpus)
    base = replace(base or TrainSetup(), num_gpus=num_gpus, seq_len=seq_len)
    replicas = base.data_parallel
    max_micro = forced.micro_batch or max(1, min(64, 2 ** int(math.log2(max(1, global_batch // replicas)))))
    if base.pipeline_parallel > 1 and not forced.micro_batch:
        max_micro = 1  # a pipeline wants many micro-batches a step: its bubble is (p - 1) / their number
    for headroom in (HEADROOM, 0.0):
        for name, overrides in forced.candidates():
            if method is not None and overrides["method"] != method:
                continue
            if overrides["method"] != "full" and not allow_adapters and method is None:
                continue
            if (base.shard_group == 1 and overrides["sharding"] != "ddp" and not overrides.get("offload")
                    and forced.sharding is None):
                continue  # sharding over one GPU saves nothing
            # within the headroom the largest micro-batch that fits; on a tight card the smallest footprint
            checkpointing = (False, True) if headroom else (True,)
            if forced.checkpointing is not None:
                checkpointing = (forced.checkpointing,)
            found = _best_micro_batch(shape, replace(base, **overrides), budget_bytes(gpu, headroom),
                                      max_micro if headroom or forced.micro_batch else 1, checkpointing,
                                      only=forced.micro_batch is not None)
            if found is None:
                continue
            setup, memory = found
            if host_ram is not None and memory.cpu_offloaded / nodes > host_ram:
                continue  # the GPUs would hold it, the hosts would not
            accum = max(1, math.ceil(global_batch / (setup.micro_batch * replicas)))
            return Choice(name, setup, memory, accum, setup.micro_batch * accum * replicas,
                          within_headroom=headroom > 0)
    return None


def tight_words(choice: Choice, gpu: Accelerator) -> str:
    """Why a tight plan may still run out of memory, and what gives it room."""
    return (f"fits in {choice.memory.total / GB:.1f} of the card's {gpu.memory_gb:g} GB, but not within the "
            f"{1 - HEADROOM:.0%} lmlab recommends (the rest absorbs allocator fragmentation, the CUDA context and "
            "spikes): it may run out of memory; a shorter sequence, more GPUs or a larger card give it room")


def what_would_fit(shape: ModelShape, gpu: Accelerator, num_gpus: int, seq_len: int,
                   base: TrainSetup | None = None) -> list[str]:
    """Concrete changes that make a plan fit, each checked against the memory model."""
    suggestions = []
    base = replace(base or TrainSetup(), num_gpus=num_gpus, seq_len=seq_len, micro_batch=1,
                   gradient_checkpointing=True)
    for gpus in (num_gpus * 2, num_gpus * 4, num_gpus * 8):
        if training_memory(shape, replace(base, num_gpus=gpus, sharding="zero3")).total <= budget_bytes(gpu):
            suggestions.append(f"{gpus} GPUs with ZeRO-3 / FSDP2 fit a full fine-tune")
            break
    suggestions += _model_parallel_fits(shape, gpu, base)
    shorter = seq_len // 2
    while shorter >= 256:
        if training_memory(shape, replace(base, seq_len=shorter, method="qlora")).total <= budget_bytes(gpu):
            suggestions.append(f"QLoRA at sequence length {shorter} fits")
            break
        shorter //= 2
    if not suggestions:
        suggestions.append("use a smaller model (fewer parameters), or GPUs with more memory")
    return suggestions


def _model_parallel_fits(shape: ModelShape, gpu: Accelerator, base: TrainSetup) -> list[str]:
    """The smallest tensor-parallel degree within a node (then pipeline stages) under which ZeRO-3 fits these
    GPUs, for a user whose runtime has them (Megatron, torchtitan, nanotron); lmlab runs data parallelism only."""
    if base.tensor_parallel * base.pipeline_parallel * base.context_parallel > 1:
        return []
    for tp in (2, 4, 8):
        for pp in (1, 2, 4, 8, 16):
            if (tp * pp > base.num_gpus or base.num_gpus % (tp * pp) or shape.num_heads % tp
                    or pp > shape.num_layers):
                continue
            setup = replace(base, sharding="zero3", tensor_parallel=tp, pipeline_parallel=pp)
            if training_memory(shape, setup).total <= budget_bytes(gpu):
                return [f"tensor parallel {tp}" + (f" x pipeline {pp}" if pp > 1 else "") + " with ZeRO-3 over the "
                        f"other GPUs fits (--tp {tp}" + (f" --pp {pp}" if pp > 1 else "") + "; sizing "
                        "only: lmlab itself runs data parallelism)"]
    return []
