"""Published memory measurements against `lmlab plan`'s memory model, as ratios in one table.

Each reference is a run someone else measured on a GPU: the model's config, the setup as its source states
it (and the assumptions this file makes where the source is silent, printed beside it), and either the
peak memory it measured or the longest sequence that fitted a card. For a peak, the ratio is the planner's
predicted total (lmlab.plan.memory.training_memory) over the measured; for a longest sequence, it is the
longest sequence whose predicted total fits the card's whole memory (no headroom) over the measured one.
Both are 1.0 when the planner is right; below 1 it is optimistic (a user would run out of memory), above 1
pessimistic (it would refuse a setup that fits). The target of issue #17 is 0.9-1.1 for every row.

    python benchmarks/planner_references.py

Nothing here runs on a GPU: it needs only lmlab's planner, and ends with `worst_ratio:`, the reference
furthest from 1 (as max(r, 1/r)), headline last. The CPU measurements of the same model are
benchmarks/memory_model.py and benchmarks/loss_memory.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lmlab.plan.memory import TrainSetup, training_memory
from lmlab.plan.params import load_preset, shape_from_config

GIB = 2**30
# LLaMA-2-7B's config as Meta published it (the planner's presets hold only current models)
LLAMA_2_7B = {"_name_or_path": "meta-llama/Llama-2-7b-hf", "model_type": "llama", "vocab_size": 32000,
              "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 32, "max_position_embeddings": 4096, "tie_word_embeddings": False}


@dataclass(frozen=True)
class Reference:
    name: str
    config: dict
    setup: TrainSetup
    source: str
    assumed: str
    measured_gib: float | None = None  # peak memory the source reports, in GiB
    card_gb: float | None = None  # or: the card's memory in GB (1e9 bytes) ...
    measured_tokens: int | None = None  # ... and the longest sequence that fitted it

    def predicted(self) -> float:
        """The planner's answer in the reference's own unit: GiB of peak memory, or the longest sequence."""
        shape = shape_from_config(self.config, self.name)
        if self.measured_gib is not None:
            return training_memory(shape, self.setup).total / GIB
        return longest_fitting(shape, self.setup, self.card_gb * 1e9)

    def measured(self) -> float:
        return self.measured_gib if self.measured_gib is not None else self.measured_tokens

    def line(self, predicted: float) -> str:
        if self.measured_gib is not None:
            return f"predicted {predicted:.1f} GiB, measured {self.measured_gib:g} GiB"
        return f"predicted {predicted:,} tokens, measured {self.measured_tokens:,} tokens on {self.card_gb:g} GB"


def longest_fitting(shape, setup: TrainSetup, card_bytes: float) -> int:
    """The longest sequence (to 16 tokens) whose predicted total fits `card_bytes`; 0 when none does."""
    low, high = 0, 1 << 21
    while high - low > 16:
        mid = (low + high) // 2
        fits = training_memory(shape, replace(setup, seq_len=max(mid, 1))).total <= card_bytes
        low, high = (mid, high) if fits else (low, mid)
    return low


LLAMA_FACTORY = ('LLaMA-Factory wiki "Performance comparison" (LLaMA-2-7B on one A100-40GB, FlashAttention-2; '
                 "as quoted in issue #17)")
LLAMA_FACTORY_ASSUMED = ("gradient checkpointing on (LLaMA-Factory's default), LoRA on q_proj and v_proj (its "
                         "default target for LLaMA then), the model's own loss (no tiles), GB read as GiB")
QLORA_8 = TrainSetup(method="qlora", seq_len=1024, micro_batch=1, gradient_checkpointing=True, attention="flash",
                     lora_rank=8, lora_targets="qv", loss_tiling="off")
UNSLOTH = ("Unsloth, \"Llama 3.3\" blog (December 2024): Hugging Face + FlashAttention-2 column, QLoRA rank 32 on "
           "all linear layers, batch 1, sequences padded to the length")
UNSLOTH_ASSUMED = "gradient checkpointing on, the model's own loss (no tiles), the card's memory as the catalogue's GB"
QLORA_32 = TrainSetup(method="qlora", micro_batch=1, gradient_checkpointing=True, attention="flash", lora_rank=32,
                      lora_targets="all-linear", loss_tiling="off")

REFERENCES = [
    *(Reference(f"LLaMA-2-7B QLoRA r8, 1 x {tokens:,}", LLAMA_2_7B, replace(QLORA_8, seq_len=tokens), LLAMA_FACTORY,
                LLAMA_FACTORY_ASSUMED, measured_gib=gib)
      for tokens, gib in ((1024, 6), (2048, 7), (4096, 9), (8192, 12), (16384, 19), (32768, 32))),
    Reference("LLaMA-2-7B QLoRA r8, 4 x 1,024", LLAMA_2_7B, replace(QLORA_8, micro_batch=4), LLAMA_FACTORY,
              LLAMA_FACTORY_ASSUMED, measured_gib=9),
    Reference("LLaMA-2-7B LoRA r8, 4 x 1,024", LLAMA_2_7B, replace(QLORA_8, method="lora", micro_batch=4),
              LLAMA_FACTORY, LLAMA_FACTORY_ASSUMED, measured_gib=17),
    Reference("Llama-3.1-8B QLoRA r32, longest on 80 GB", load_preset("llama-3.1-8b"), QLORA_32, UNSLOTH,
              UNSLOTH_ASSUMED, card_gb=80, measured_tokens=28_000),
    Reference("Llama-3.3-70B QLoRA r32, longest on 80 GB", load_preset("llama-3.1-70b"), QLORA_32, UNSLOTH,
              UNSLOTH_ASSUMED + " (Llama 3.3 70B has Llama 3.1 70B's shape)", card_gb=80, measured_tokens=6_916),
]


def main() -> None:
    ratios = []
    sources = {}
    for ref in REFERENCES:
        predicted = ref.predicted()
        ratios.append(predicted / ref.measured())
        key = sources.setdefault((ref.source, ref.assumed), len(sources) + 1)
        print(f"{ref.name}: {ref.line(predicted)}, predicted/measured {ratios[-1]:.2f} [{key}]")
    for (source, assumed), key in sources.items():
        print(f"[{key}] {source}; assumed: {assumed}")
    worst = max(max(r, 1 / r) if r > 0 else float("inf") for r in ratios)
    within = sum(0.9 <= r <= 1.1 for r in ratios)
    print(f"within_10pct: {within}/{len(REFERENCES)}")
    print(f"worst_ratio: {worst:.2f}")


if __name__ == "__main__":
    main()
