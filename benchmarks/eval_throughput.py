"""Samples/s of batched generation (KV cache, left padding) against one prompt at a time, in one run.

Both sides call the same `lmlab.evaluate.generation.generate` on the same model,
prompts and settings (sampling, temperature 0.8, fixed seed, `max_new_tokens`
forced by suppressing the stop tokens so every sample has the same length and
the comparison is not about which side stops earlier); only `batch_size`
differs. Rounds alternate A B, B A so drift in machine speed hits both; the
headline is the median of the pair-by-pair speed-ups.

    python benchmarks/eval_throughput.py                 # ~2M-parameter Llama, 64 math prompts
    python benchmarks/eval_throughput.py --prompts 128 --batch 64 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def build(workdir: Path):
    """The demo-sized model (random weights: speed does not depend on what it learned) and a tokenizer."""
    from lmlab.data.general import general_documents
    from lmlab.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
    from lmlab.models.build import build_model
    from lmlab.recipe import ModelConfig

    tok = train_tokenizer((t for _, t in general_documents(limit=800)), vocab_size=4096, max_bytes=2_000_000)
    save_tokenizer(tok, workdir / "tok")
    tokenizer = load_tokenizer(workdir / "tok")
    config = ModelConfig(hidden_size=128, num_layers=8, num_heads=4, num_kv_heads=2, intermediate_size=384,
                         max_position_embeddings=1024)
    return build_model(config, tokenizer, seed=0), tokenizer


def samples_per_second(model, tokenizer, prompts: list[str], batch_size: int, new_tokens: int) -> float:
    from lmlab.evaluate.generation import generate

    start = time.perf_counter()
    out = generate(model, tokenizer, prompts, max_new_tokens=new_tokens, batch_size=batch_size, do_sample=True,
                   temperature=0.8, seed=0, min_new_tokens=new_tokens)
    elapsed = time.perf_counter() - start
    assert len(out) == len(prompts)
    return len(prompts) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch

    from lmlab.data.mathgen import DEFAULT_SYSTEM, math_problems
    from lmlab.evaluate.generation import render_prompts

    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = build(Path(tmp))
        prompts = render_prompts(tokenizer, [p.prompt for p in math_problems("id", args.prompts, seed=7)],
                                 system=DEFAULT_SYSTEM)
        samples_per_second(model, tokenizer, prompts[:4], 4, 4)  # warm-up
        batched, single, ratios = [], [], []
        for r in range(args.rounds):
            order = ("batched", "single") if r % 2 == 0 else ("single", "batched")
            got = {}
            for side in order:
                got[side] = samples_per_second(model, tokenizer, prompts, args.batch if side == "batched" else 1,
                                               args.new_tokens)
            batched.append(got["batched"])
            single.append(got["single"])
            ratios.append(got["batched"] / got["single"])
            print(f"round {r + 1}: batched {got['batched']:.1f} samples/s, one-at-a-time {got['single']:.1f} "
                  f"samples/s, ratio {ratios[-1]:.2f}", flush=True)
    print(f"prompts: {args.prompts}")
    print(f"new_tokens: {args.new_tokens}")
    print(f"batch_size: {args.batch}")
    print(f"batched_samples_per_s: {statistics.median(batched):.1f}")
    print(f"single_samples_per_s: {statistics.median(single):.1f}")
    print(f"ratio: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
