"""Pick the simplest parallel strategy that fits, and the micro-batch / accumulation to reach the batch.

Order of preference (simplest first, docs/rules.md §4): DDP, ZeRO-2, ZeRO-3 (FSDP2),
ZeRO-3 with CPU offload, then for fine-tuning LoRA and QLoRA. A strategy fits when
its total memory stays under 70% of the GPU (30% headroom for fragmentation,
allocator caches and spikes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from lmlab.plan.hardware import Accelerator
from lmlab.plan.memory import GB, MemoryBreakdown, TrainSetup, training_memory
from lmlab.plan.params import ModelShape

HEADROOM = 0.30


@dataclass
class Choice:
    name: str
    setup: TrainSetup
    memory: MemoryBreakdown
    grad_accum: int
    global_batch: int  # sequences per optimizer step = micro x accum x GPUs


CANDIDATES = [
    ("DDP", dict(method="full", sharding="ddp")),
    ("ZeRO-2", dict(method="full", sharding="zero2")),
    ("ZeRO-3 / FSDP2", dict(method="full", sharding="zero3")),
    ("ZeRO-3 + CPU offload", dict(method="full", sharding="zero3", offload=True)),
    ("LoRA", dict(method="lora", sharding="ddp")),
    ("QLoRA", dict(method="qlora", sharding="ddp")),
]


def budget_bytes(gpu: Accelerator) -> float:
    return gpu.memory_gb * GB * (1 - HEADROOM)


def _best_micro_batch(shape: ModelShape, base: TrainSetup, gpu: Accelerator, max_micro: int) -> TrainSetup | None:
    """Largest power-of-two micro-batch that fits, first without then with gradient checkpointing."""
    for checkpointing in (False, True):
        micro = max_micro
        while micro >= 1:
            setup = replace(base, micro_batch=micro, gradient_checkpointing=checkpointing)
            if training_memory(shape, setup).total <= budget_bytes(gpu):
                return setup
            micro //= 2
    return None


def choose_strategy(shape: ModelShape, gpu: Accelerator, num_gpus: int, seq_len: int, global_batch: int,
                    allow_adapters: bool, base: TrainSetup | None = None, method: str | None = None) -> Choice | None:
    """The first candidate that fits; None when nothing does (see `what_would_fit`)."""
    base = replace(base or TrainSetup(), num_gpus=num_gpus, seq_len=seq_len)
    max_micro = max(1, min(64, 2 ** int(math.log2(max(1, global_batch // num_gpus)))))
    for name, overrides in CANDIDATES:
        if method is not None and overrides["method"] != method:
            continue
        if overrides["method"] != "full" and not allow_adapters and method is None:
            continue
        if num_gpus == 1 and overrides["sharding"] in ("zero2", "zero3") and not overrides.get("offload"):
            continue  # sharding over one GPU saves nothing
        setup = _best_micro_batch(shape, replace(base, **overrides), gpu, max_micro)
        if setup is not None:
            accum = max(1, math.ceil(global_batch / (setup.micro_batch * num_gpus)))
            return Choice(name, setup, training_memory(shape, setup), accum, setup.micro_batch * accum * num_gpus)
    return None


def what_would_fit(shape: ModelShape, gpu: Accelerator, num_gpus: int, seq_len: int) -> list[str]:
    """Concrete changes that make a plan fit, each checked against the memory model."""
    suggestions = []
    base = TrainSetup(num_gpus=num_gpus, seq_len=seq_len, micro_batch=1, gradient_checkpointing=True)
    for gpus in (num_gpus * 2, num_gpus * 4, num_gpus * 8):
        if training_memory(shape, replace(base, num_gpus=gpus, sharding="zero3")).total <= budget_bytes(gpu):
            suggestions.append(f"{gpus} GPUs with ZeRO-3 / FSDP2 fit a full fine-tune")
            break
    shorter = seq_len // 2
    while shorter >= 256:
        if training_memory(shape, replace(base, seq_len=shorter, method="qlora")).total <= budget_bytes(gpu):
            suggestions.append(f"QLoRA at sequence length {shorter} fits")
            break
        shorter //= 2
    if not suggestions:
        suggestions.append("use a smaller model (fewer parameters), or GPUs with more memory")
    return suggestions
