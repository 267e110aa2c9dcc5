"""Tokens/s and MFU of `lmlab pretrain` against a bare PyTorch loop on one GPU, for 125M, 350M and 1B
Llama configs in bf16, side by side in one run (the same model, batches, optimizer and schedule as
benchmarks/pretrain_throughput.py, whose two timing functions this reuses).

    python benchmarks/gpu_pretrain.py                  # all three sizes
    python benchmarks/gpu_pretrain.py --sizes 1b --steps 30

MFU counts 6N FLOPs per token for the weight matmuls plus causal attention (lmlab.plan.compute) against
the GPU's dense bf16 peak from lmlab's catalogue. Without a CUDA GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretrain_throughput as side_by_side  # noqa: E402

# Llama shapes: GPT-3 small / medium widths with Llama's SwiGLU and GQA, and Llama 3.2 1B
SIZES = {
    "125m": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "num_kv_heads": 4, "intermediate_size": 2048},
    "350m": {"hidden_size": 1024, "num_layers": 24, "num_heads": 16, "num_kv_heads": 8, "intermediate_size": 2816},
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128},
    "1b": {"hidden_size": 2048, "num_layers": 16, "num_heads": 32, "num_kv_heads": 8, "intermediate_size": 8192},
}
VOCAB = 32768


def mfu(tokens_per_s: float, model: dict, seq_len: int, vocab: int) -> float:
    from lmlab.plan.compute import flops_per_token
    from lmlab.plan.params import count_params, shape_from_model_block
    from lmlab.recipe import ModelConfig
    from lmlab.stages.common import device_peak_flops

    shape = shape_from_model_block(ModelConfig(**model), vocab)
    return tokens_per_s * flops_per_token(count_params(shape).active, shape, seq_len) / device_peak_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["125m", "350m", "1b"], choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)  # the code path, on CPU
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("gpu_pretrain: no CUDA GPU visible; run it on a GPU machine (nothing measured)")
        return
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu (smoke run)'}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        vocab = side_by_side.write_tokenizer(workdir, VOCAB, 20_000_000)
        print(f"vocab: {vocab}")
        for size in args.sizes:
            model = {**SIZES[size], "max_position_embeddings": args.seq_len}
            lmlab_tps, bare_tps = side_by_side.alternate(workdir, args.steps, args.seq_len, args.micro_batch,
                                                         args.rounds, model, name=size)
            ratio = statistics.median(a / b for a, b in zip(lmlab_tps, bare_tps))
            lm, bare = statistics.median(lmlab_tps), statistics.median(bare_tps)
            print(f"lmlab_tokens_per_s_{size}: {lm:.0f}")
            print(f"bare_tokens_per_s_{size}: {bare:.0f}")
            print(f"mfu_bare_{size}: {mfu(bare, model, args.seq_len, vocab):.3f}")
            lmlab_mfu = mfu(lm, model, args.seq_len, vocab)
            print(f"mfu_{size}: {lmlab_mfu:.3f}")
            print(f"ratio_{size}: {ratio:.3f}")
    print(f"mfu: {lmlab_mfu:.3f}")  # the headline is the last (largest) size's
    print(f"ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()
