"""Muon against AdamW: the tokens each needs to reach AdamW's final validation loss.

Both pretrain the same tiny Llama on the embedded general corpus with the same data order,
budget, cosine schedule, warmup and clipping, through the real pretraining stage. Each
optimizer gets a small LR grid fixed here before any run; the LR with the lower final
validation loss on seed 0 is then run on seeds 1 and 2 as well. Runs are paired by seed (the seed sets the
initial weights and the data order for both). The target of seed s is AdamW's final
validation loss on seed s; the tokens at which each run's validation loss first reaches it
are read off its evaluations (linear between two evaluations; a Muon run that never
reaches it is reported as such and leaves the ratio undefined). The headline is Muon's
mean tokens over AdamW's: below 1 means Muon gets there sooner.

    python benchmarks/optimizers.py                 # ~2 minutes per run on 2 CPU cores
    python benchmarks/optimizers.py --tokens 200000 --seeds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

MODEL = {"hidden_size": 96, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 256,
         "max_position_embeddings": 256}
# fixed before running: AdamW around lmlab's pretraining default (3e-3); Muon around nanochat's 0.02, its
# AdamW part (embeddings, norms) at the pretraining default
GRIDS = {"adamw": [{"lr": 1e-3}, {"lr": 3e-3}, {"lr": 1e-2}],
         "muon": [{"optimizer": "muon", "lr": 3e-3, "muon_lr": lr} for lr in (0.01, 0.02, 0.04)]}


def recipe(workdir: Path, name: str, optim: dict, seed: int, tokens: int):
    from lmlab.loading import validate_recipe

    tokenizer = workdir / "tokenizer"
    return validate_recipe({
        "name": name, "seed": seed, "model": MODEL,
        "tokenizer": {"path": str(tokenizer)} if tokenizer.exists() else {"vocab_size": 1024,
                                                                         "max_train_bytes": 1_000_000},
        "data": {"train": {"kind": "general", "limit": 2000}, "seq_len": 128, "validation_fraction": 0.02},
        "optim": {"schedule": "cosine", "warmup_ratio": 0.05, **optim},
        "train": {"tokens": tokens, "micro_batch_size": 8, "log_every": 20, "eval_every": 20, "eval_batches": 8,
                  "save_every": 100_000},
        "output": {"dir": str(workdir / "runs"), "report_to": []},
    })


def train(workdir: Path, name: str, optim: dict, seed: int, tokens: int) -> list[tuple[int, float]]:
    """(tokens seen, validation loss) at each evaluation of one run."""
    from lmlab.data.tokenizer import load_tokenizer, save_tokenizer
    from lmlab.stages import run_stage

    r = recipe(workdir, name, optim, seed, tokens)
    final = run_stage(r, overwrite=True)
    if not (workdir / "tokenizer").exists():  # the first run trains it; every later run reuses it
        save_tokenizer(load_tokenizer(final), workdir / "tokenizer")
    rows = [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(row["tokens_seen"], row["eval_loss"]) for row in rows if "eval_loss" in row]


def tokens_to(curve: list[tuple[int, float]], target: float) -> float | None:
    """The first token count at which the validation loss is at or below `target` (linear in between)."""
    for (t0, l0), (t1, l1) in zip([(0, float("inf")), *curve], curve):
        if l1 <= target:
            return t1 if l0 == float("inf") or l0 == l1 else t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=400_000)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="lmlab-optimizers-"))
    best: dict[str, dict] = {}
    for kind, grid in GRIDS.items():
        finals = []
        for i, optim in enumerate(grid):
            curve = train(workdir, f"{kind}{i}-s0", optim, 0, args.tokens)
            finals.append((curve[-1][1], i, curve))
            print(f"{kind} {optim}: seed 0 final validation loss {curve[-1][1]:.4f}", flush=True)
        loss, i, curve = min(finals, key=lambda f: f[0])
        best[kind] = {"optim": grid[i], "curves": [curve]}
        for seed in range(1, args.seeds):
            best[kind]["curves"].append(train(workdir, f"{kind}{i}-s{seed}", grid[i], seed, args.tokens))
    targets = [c[-1][1] for c in best["adamw"]["curves"]]  # seed s: AdamW's final validation loss on seed s
    needed = {kind: [tokens_to(c, t) for c, t in zip(b["curves"], targets)] for kind, b in best.items()}
    for kind, b in best.items():
        print(f"{kind} at {b['optim']}: final validation loss by seed "
              + ", ".join(f"{c[-1][1]:.4f}" for c in b["curves"]) + "; tokens to AdamW's final loss "
              + ", ".join("never" if n is None else f"{n:,.0f}" for n in needed[kind]))
    reached = [n for n in needed["muon"] if n is not None]
    print(f"adamw_final_loss: {statistics.mean(targets):.4f}")
    print(f"muon_final_loss: {statistics.mean(c[-1][1] for c in best['muon']['curves']):.4f}")
    print(f"muon_seeds_reaching_target: {len(reached)}/{args.seeds}")
    ratio = (statistics.mean(reached) / statistics.mean(needed["adamw"]) if len(reached) == args.seeds
             else float("nan"))
    print(f"tokens_ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()
