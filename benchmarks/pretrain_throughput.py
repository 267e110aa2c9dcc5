"""Tokens/s of `lmlab pretrain` against a bare PyTorch loop, side by side in one run.

Both train the same model (same config and seed), on the same packed batches
(input ids, position ids, labels), with the same micro-batch, sequence length,
step count, AdamW settings, cosine schedule and gradient clipping. The lmlab side
is the real stage (`prepare_pretrain` then `trainer.train()`: HF Trainer,
callbacks, progress bar, logging, final checkpoint) with evaluation turned off;
the bare side is the loop nanoGPT would write (wrapped in DistributedDataParallel with a
DistributedSampler on several processes). They alternate A B, B A so drift in
machine speed hits both; the headline is the median of the pair-by-pair ratios.
On a GPU both sides train in bf16 there (lmlab's `precision: auto`, autocast in the bare loop).

    python benchmarks/pretrain_throughput.py            # ~2M-parameter model, CPU
    python benchmarks/pretrain_throughput.py --steps 40 --rounds 3
    python benchmarks/pretrain_throughput.py --nproc 2  # both sides on 2 processes (gloo on CPU)
    python benchmarks/pretrain_throughput.py --nproc 2 --fsdp2   # and the bare loop under FSDP2 vs DDP
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


TINY = {"hidden_size": 128, "num_layers": 8, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 384,
        "max_position_embeddings": 1024}
VOCAB = 4096


def recipe_for(workdir: Path, steps: int, seq_len: int, micro: int, name: str, model: dict | None = None):
    from lmlab.loading import validate_recipe

    return validate_recipe({
        "name": name, "seed": 0,
        "model": model or TINY,
        "tokenizer": {"vocab_size": VOCAB, "max_train_bytes": 2_000_000,
                      "path": str(workdir / "tokenizer") if (workdir / "tokenizer").exists() else None},
        "data": {"train": {"kind": "general", "limit": 3000}, "seq_len": seq_len, "validation_fraction": 0.0},
        "optim": {"lr": 3e-3, "schedule": "cosine", "warmup_ratio": 0.05},
        "train": {"max_steps": steps, "micro_batch_size": micro, "log_every": 10, "save_every": 10 * steps,
                  "eval_every": 10 * steps},
        "output": {"dir": str(workdir / "runs"), "report_to": ["tensorboard"]},
    })


def time_lmlab(workdir: Path, steps: int, seq_len: int, micro: int, name: str, model: dict | None = None) -> float:
    from lmlab.stages.packed import prepare_packed as prepare_pretrain

    recipe = recipe_for(workdir, steps, seq_len, micro, name, model)
    job = prepare_pretrain(recipe)
    synchronize()
    start = time.perf_counter()
    job.trainer.train()
    synchronize()
    elapsed = time.perf_counter() - start
    step_seconds = job.trainer.callback_handler.callbacks[0].train_seconds
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"lmlab: {elapsed:.2f}s in train(), {step_seconds:.2f}s inside optimizer steps", flush=True)
    return steps * job.budget.tokens_per_step / elapsed


def time_bare(workdir: Path, steps: int, seq_len: int, micro: int, model: dict | None = None,
              shard: str = "ddp", losses: list | None = None) -> float:
    """The loop a person writes by hand: no Trainer, no callbacks, no logging. On several processes the
    model is wrapped in DDP, or (`shard="fsdp2"`) sharded with FSDP2's `fully_shard`, one unit per
    decoder layer and one for the rest; `losses` collects every step's loss (a sync per step)."""
    import torch

    from lmlab.data.pretrain_data import build_packed_data
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.models.build import build_model

    recipe = recipe_for(workdir, steps, seq_len, micro, "bare", model)
    tokenizer = load_tokenizer(workdir / "tokenizer")
    data = build_packed_data(recipe.data, tokenizer, recipe.seed, max_validation_rows=0)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    model = build_model(recipe.model, tokenizer, seed=recipe.seed).to(device)
    model.config.use_cache = False
    model.train()
    warmup = int(0.05 * steps)

    def lr_lambda(step):
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world > 1:
        sampler = torch.utils.data.DistributedSampler(data.train, shuffle=True, seed=0)
        loader = torch.utils.data.DataLoader(data.train, batch_size=micro, sampler=sampler)
        if shard == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        else:
            model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        loader = torch.utils.data.DataLoader(data.train, batch_size=micro, shuffle=True,
                                             generator=torch.Generator().manual_seed(0))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    batches = iter(loader)
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        batch = {k: v.to(device) for k, v in next(batches).items()}
        # the Trainer's bf16: fp32 weights and optimizer, matmuls under bf16 autocast
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        if losses is not None:
            mean = loss.detach().clone()
            if world > 1:
                torch.distributed.all_reduce(mean)
            losses.append(float(mean) / world)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    synchronize()
    elapsed = time.perf_counter() - start
    return steps * micro * seq_len * world / elapsed


def synchronize() -> None:
    """Every rank (and the GPU) done with what came before, so a timer on rank 0 sees the whole job."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8, help="per process")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--nproc", type=int, default=1, help="processes for both sides (torchrun)")
    parser.add_argument("--fsdp2", action="store_true", help="also train the bare loop under FSDP2 (fully_shard) "
                        "and compare its losses and speed with DDP's (needs --nproc 2 or more)")
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)  # shared by the ranks
    args = parser.parse_args()
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:  # start the ranks, each runs main() below
        # the ranks get every option but --nproc, which torchrun's own parser would take for an abbreviation
        forwarded = [f"--steps={args.steps}", f"--seq-len={args.seq_len}", f"--micro-batch={args.micro_batch}",
                     f"--rounds={args.rounds}", *(["--fsdp2"] if args.fsdp2 else [])]
        with tempfile.TemporaryDirectory() as tmp:
            raise SystemExit(subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                              f"--nproc_per_node={args.nproc}", __file__, *forwarded,
                                              f"--workdir={tmp}"]))
    if args.workdir is not None:
        measure(args, args.workdir)
        return
    with tempfile.TemporaryDirectory() as tmp:
        measure(args, Path(tmp))


def write_tokenizer(workdir: Path, vocab_size: int, max_bytes: int) -> int:
    """Train the benchmark's tokenizer on the recipe's corpus into `workdir/tokenizer` (rank 0; the
    others wait); returns its vocabulary size."""
    from lmlab.data.pretrain_data import load_documents
    from lmlab.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

    if int(os.environ.get("RANK", 0)) == 0:
        docs = load_documents(recipe_for(workdir, 1, 64, 1, "setup").data.train, streaming=True, seed=0)
        save_tokenizer(train_tokenizer((r["text"] for r in docs), vocab_size=vocab_size, max_bytes=max_bytes),
                       workdir / "tokenizer")
    synchronize()
    return len(load_tokenizer(workdir / "tokenizer"))


def alternate(workdir: Path, steps: int, seq_len: int, micro: int, rounds: int, model: dict | None = None,
              name: str = "bench") -> tuple[list[float], list[float]]:
    """Tokens/s of lmlab and of the bare loop, `rounds` each, after a warm-up (it caches the packed data
    and JIT paths); A B, then B A, so neither side always runs first."""
    import torch

    time_bare(workdir, 3, seq_len, micro, model)
    lmlab_tps, bare_tps = [], []
    for round_ in range(rounds):
        runs = [lambda: lmlab_tps.append(time_lmlab(workdir, steps, seq_len, micro, f"{name}{round_}", model)),
                lambda: bare_tps.append(time_bare(workdir, steps, seq_len, micro, model))]
        for run in runs if round_ % 2 == 0 else runs[::-1]:
            run()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return lmlab_tps, bare_tps


def compare_fsdp2(workdir: Path, steps: int, seq_len: int, micro: int) -> dict[str, str]:
    """The bare loop under DDP and under FSDP2 on the same batches: the losses agree (sharding changes
    where the parameters live, not the arithmetic), and the speed ratio says what sharding costs here."""
    ddp_losses: list[float] = []
    fsdp_losses: list[float] = []
    ddp = time_bare(workdir, steps, seq_len, micro, shard="ddp", losses=ddp_losses)
    fsdp = time_bare(workdir, steps, seq_len, micro, shard="fsdp2", losses=fsdp_losses)
    diff = max(abs(a - b) / abs(a) for a, b in zip(ddp_losses, fsdp_losses))
    return {"fsdp2_last_loss": f"{fsdp_losses[-1]:.4f}", "ddp_last_loss": f"{ddp_losses[-1]:.4f}",
            "fsdp2_max_relative_loss_difference": f"{diff:.2e}", "fsdp2_over_ddp_tokens_per_s": f"{fsdp / ddp:.3f}"}


def measure(args, workdir: Path) -> None:
    import torch

    rank = int(os.environ.get("RANK", 0))
    if "LOCAL_RANK" in os.environ and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    write_tokenizer(workdir, VOCAB, 2_000_000)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    fsdp2 = compare_fsdp2(workdir, args.steps, args.seq_len, args.micro_batch) if args.fsdp2 and world > 1 else None
    lmlab_tps, bare_tps = alternate(workdir, args.steps, args.seq_len, args.micro_batch, args.rounds)
    if rank != 0:
        return
    lm, bare = statistics.median(lmlab_tps), statistics.median(bare_tps)
    pair_ratios = [a / b for a, b in zip(lmlab_tps, bare_tps)]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x {torch.get_num_threads()} threads"
    print(f"device: {device}")
    print(f"processes: {world}")
    print(f"steps: {args.steps}")
    print(f"tokens_per_step: {args.micro_batch * args.seq_len * world}")
    print(f"lmlab_tokens_per_s_runs: {', '.join(f'{x:.0f}' for x in lmlab_tps)}")
    print(f"bare_tokens_per_s_runs: {', '.join(f'{x:.0f}' for x in bare_tps)}")
    print(f"lmlab_tokens_per_s: {lm:.0f}")
    print(f"bare_tokens_per_s: {bare:.0f}")
    print(f"pair_ratios: {', '.join(f'{x:.3f}' for x in pair_ratios)}")
    print(f"ratio_of_medians: {lm / bare:.3f}")
    if fsdp2 is not None:
        for key, value in fsdp2.items():
            print(f"{key}: {value}")
    print(f"ratio: {statistics.median(pair_ratios):.3f}")


if __name__ == "__main__":
    main()
