"""Peak memory of one training step's loss, with and without tiles, measured on CPU.

Each case runs in a fresh process: a one-layer Llama (hidden 256) with a vocabulary of
32k, 128k or 256k entries takes one forward and backward on a row of 1k-8k tokens. The
process's peak RSS (VmHWM, reset just before each step) is compared with its RSS just
before the step, first for the backbone alone (no head: the step's memory without logits)
and then, in the same process, for one of three ways of computing the loss: `plain` (the
model's own loss from the whole logits), `chunks` (lmlab's checkpointed chunks, what
pretraining, CPT and distillation use without Triton) and `fused` (TRL's fused LM head, their
path on CUDA; on CPU it runs its torch fallback). The logits' share of a step is its peak
minus the backbone's; the tiled ways take the median of 3 processes. Each child maps every block of 64 KiB
or more on its own (MALLOC_MMAP_THRESHOLD_), so that its RSS follows what its tensors hold rather than what
glibc's heap kept from earlier frees (the GPU's caching allocator is measured by the planner's CUDA check). The headline is plain's
share over chunks' at 128k entries and 4k tokens. The planner's loss-step term
(lmlab.plan.memory.loss_step_bytes) is printed beside each as predicted/measured.

    python benchmarks/loss_memory.py                    # ~18 minutes on 2 CPU cores
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

VOCABS = [32_000, 128_256, 256_000]
TOKENS = [1024, 4096, 8192]
HIDDEN = 256
WAYS = ("plain", "chunks", "fused")
MEMORY_LIMIT = 14e9  # cases whose plain loss step would need more are skipped on a 24 GB machine
REPEATS = 3
# glibc keeps freed blocks below its (self-adjusting) mmap threshold in its heap, so whether a few hundred MiB
# of chunk buffers show up in the peak RSS depended on what the process had freed before: the same case
# measured 376-420 MiB from one process to the next. Mapping every block from 64 KiB up on its own makes RSS
# follow what the tensors hold, and the measurement repeat to the MiB.
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    """This process's peak RSS since the last reset_peak (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak() -> None:
    """Start the peak RSS over from the current RSS (Linux: writing 5 to clear_refs resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def one_step(vocab: int, tokens: int, how: str) -> dict[str, float]:
    """Runs in the child: the peak RSS of the step above the RSS before it, and the same for the backbone alone
    (no head) in the same process, right before, so both see the same allocator state; in bytes."""
    import ctypes
    import gc

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmlab.models.tiled import add_tiled_head, chunked_cross_entropy

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True, use_cache=False))
    if how == "fused":
        add_tiled_head(model)
    ids = torch.randint(0, vocab, (1, tokens))
    for p in model.parameters():  # gradients allocated before the baseline: only the step's transients count
        p.grad = torch.zeros_like(p)

    def step_bytes(run) -> int:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # the previous step's freed memory back to the system first
        before = rss()
        reset_peak()
        run().backward()
        return peak_rss() - before

    backbone = step_bytes(lambda: model.model(input_ids=ids).last_hidden_state.float().pow(2).mean())
    if how == "fused":
        step = step_bytes(lambda: model(input_ids=ids, labels=ids, fused_lm_head=True).loss)
    elif how == "chunks":
        step = step_bytes(lambda: chunked_cross_entropy(model, {"input_ids": ids}, ids))
    else:
        step = step_bytes(lambda: model(input_ids=ids, labels=ids).loss)
    return {"step_bytes": step, "backbone_bytes": backbone}


def measure(vocab: int, tokens: int, how: str) -> float | None:
    """The logits' share of one step: its peak above the backbone's, measured in one fresh process."""
    code = f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from loss_memory import one_step; " \
           f"print(json.dumps(one_step({vocab}, {tokens}, '{how}')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=CHILD_ENV)
    if done.returncode:
        print(f"  {how} {vocab} x {tokens}: failed ({done.stderr.strip().splitlines()[-1:]})")
        return None
    got = json.loads(done.stdout.strip().splitlines()[-1])
    return got["step_bytes"] - got["backbone_bytes"]


def repeated(vocab: int, tokens: int, how: str) -> float | None:
    """The median of REPEATS fresh processes for the tiled ways (their share is a few hundred MiB, where the
    allocator moves tens from one process to the next); one for the whole logits (gigabytes)."""
    import statistics

    runs = [measure(vocab, tokens, how) for _ in range(1 if how == "plain" else REPEATS)]
    return None if None in runs else statistics.median(runs)


def loss_cases() -> tuple[dict, list[float]]:
    """Every case measured and printed: ({(vocab, tokens): logits' share per way}, predicted/measured ratios)."""
    from lmlab.plan.memory import loss_step_bytes

    shares = {}
    ratios = []
    for vocab in VOCABS:
        for tokens in TOKENS:
            if 12 * vocab * tokens > MEMORY_LIMIT:
                print(f"{vocab} x {tokens}: skipped (the plain loss step needs ~{12 * vocab * tokens / 1e9:.0f} GB)")
                continue
            share = {how: repeated(vocab, tokens, how) for how in WAYS}
            if None in share.values():
                continue
            shares[(vocab, tokens)] = share
            line = f"{vocab} x {tokens}: logits' share " + ", ".join(f"{how} {share[how] / 2**20:,.0f} MiB"
                                                                    for how in WAYS)
            for how in WAYS:
                predicted = loss_step_bytes(vocab, tokens, HIDDEN, precision_bytes=4,
                                            tiling={"plain": "off"}.get(how, how), triton=False)
                ratios.append(predicted / share[how])
                line += f"; {how} predicted/measured {predicted / share[how]:.2f}"
            print(line, flush=True)
    return shares, ratios


def main() -> None:
    shares, ratios = loss_cases()
    print(f"predicted_over_measured_min: {min(ratios):.2f}")
    print(f"predicted_over_measured_max: {max(ratios):.2f}")
    headline = shares.get((128_256, 4096))
    print(f"logits_share_reduction_128k_4k: {headline['plain'] / headline['chunks']:.1f}" if headline
          else "logits_share_reduction_128k_4k: nan")


if __name__ == "__main__":
    main()
