"""Tokens/s of `lmlab pretrain` against a bare PyTorch loop, side by side in one run.

Both train the same model (same config and seed), on the same packed batches
(input ids, position ids, labels), with the same micro-batch, sequence length,
step count, AdamW settings, cosine schedule and gradient clipping. The lmlab side
is the real stage (`prepare_pretrain` then `trainer.train()`: HF Trainer,
callbacks, progress bar, logging, final checkpoint) with evaluation turned off;
the bare side is the loop nanoGPT would write. They alternate A B, B A so drift in
machine speed hits both; the headline is the median of the pair-by-pair ratios.

    python benchmarks/pretrain_throughput.py            # ~2M-parameter model, CPU
    python benchmarks/pretrain_throughput.py --steps 40 --rounds 3
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path


def recipe_for(workdir: Path, steps: int, seq_len: int, micro: int, name: str):
    from lmlab.recipe import validate_recipe

    return validate_recipe({
        "name": name, "seed": 0,
        "model": {"hidden_size": 128, "num_layers": 8, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 384, "max_position_embeddings": 1024},
        "tokenizer": {"vocab_size": 4096, "max_train_bytes": 2_000_000,
                      "path": str(workdir / "tokenizer") if (workdir / "tokenizer").exists() else None},
        "data": {"train": {"kind": "general", "limit": 3000}, "seq_len": seq_len, "validation_fraction": 0.0},
        "optim": {"lr": 3e-3, "schedule": "cosine", "warmup_ratio": 0.05},
        "train": {"max_steps": steps, "micro_batch_size": micro, "log_every": 10, "save_every": 10 * steps,
                  "eval_every": 10 * steps},
        "output": {"dir": str(workdir / "runs"), "report_to": ["tensorboard"]},
    })


def time_lmlab(workdir: Path, steps: int, seq_len: int, micro: int, name: str) -> float:
    from lmlab.stages.packed import prepare_packed as prepare_pretrain

    recipe = recipe_for(workdir, steps, seq_len, micro, name)
    job = prepare_pretrain(recipe)
    start = time.perf_counter()
    job.trainer.train()
    elapsed = time.perf_counter() - start
    step_seconds = job.trainer.callback_handler.callbacks[0].train_seconds
    print(f"lmlab: {elapsed:.2f}s in train(), {step_seconds:.2f}s inside optimizer steps", flush=True)
    return steps * job.budget.tokens_per_step / elapsed


def time_bare(workdir: Path, steps: int, seq_len: int, micro: int) -> float:
    """The loop a person writes by hand: no Trainer, no callbacks, no logging."""
    import torch

    from lmlab.data.pretrain_data import build_packed_data
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.models.build import build_model

    recipe = recipe_for(workdir, steps, seq_len, micro, "bare")
    tokenizer = load_tokenizer(workdir / "tokenizer")
    data = build_packed_data(recipe.data, tokenizer, recipe.seed, max_validation_rows=0)
    model = build_model(recipe.model, tokenizer, seed=recipe.seed)
    model.config.use_cache = False
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    warmup = int(0.05 * steps)

    def lr_lambda(step):
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    loader = torch.utils.data.DataLoader(data.train, batch_size=micro, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    batches = iter(loader)
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    return steps * micro * seq_len / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    import torch

    from lmlab.data.pretrain_data import load_documents
    from lmlab.data.tokenizer import save_tokenizer, train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        recipe = recipe_for(workdir, args.steps, args.seq_len, args.micro_batch, "setup")
        docs = load_documents(recipe.data.train, streaming=True, seed=0)
        save_tokenizer(train_tokenizer((r["text"] for r in docs), vocab_size=4096, max_bytes=2_000_000),
                       workdir / "tokenizer")
        time_bare(workdir, 3, args.seq_len, args.micro_batch)  # warm-up: caches the packed data, JIT paths
        lmlab_tps, bare_tps = [], []
        for round_ in range(args.rounds):  # A B, then B A: neither side always runs first
            run_lmlab = lambda: lmlab_tps.append(time_lmlab(workdir, args.steps, args.seq_len,  # noqa: E731
                                                            args.micro_batch, f"bench{round_}"))
            run_bare = lambda: bare_tps.append(time_bare(workdir, args.steps, args.seq_len, args.micro_batch))  # noqa: E731
            for run in ((run_lmlab, run_bare) if round_ % 2 == 0 else (run_bare, run_lmlab)):
                run()
        lm, bare = statistics.median(lmlab_tps), statistics.median(bare_tps)
        pair_ratios = [a / b for a, b in zip(lmlab_tps, bare_tps)]
        print(f"device: cpu x {torch.get_num_threads()} threads")
        print(f"steps: {args.steps}")
        print(f"tokens_per_step: {args.micro_batch * args.seq_len}")
        print(f"lmlab_tokens_per_s_runs: {', '.join(f'{x:.0f}' for x in lmlab_tps)}")
        print(f"bare_tokens_per_s_runs: {', '.join(f'{x:.0f}' for x in bare_tps)}")
        print(f"lmlab_tokens_per_s: {lm:.0f}")
        print(f"bare_tokens_per_s: {bare:.0f}")
        print(f"pair_ratios: {', '.join(f'{x:.3f}' for x in pair_ratios)}")
        print(f"ratio_of_medians: {lm / bare:.3f}")
        print(f"ratio: {statistics.median(pair_ratios):.3f}")


if __name__ == "__main__":
    main()
