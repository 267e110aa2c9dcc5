"""Which process am I: rank helpers for runs under `torchrun` / `accelerate launch`.

Every rank runs the same stage code; only rank 0 writes run directories,
recipes, tokenizers, manifests, `final/` and reports, and the others wait for it
at a barrier. The process group is accelerate's (`PartialState`), the same one
the HF Trainer uses, so lmlab never starts a second one. On a machine without a
GPU it is gloo on CPU, which is how the multi-process tests run.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from lmlab.errors import LmlabError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def accelerator_available() -> bool:
    """A GPU (or Apple MPS) torch can train on; otherwise training runs on CPU (gloo when distributed)."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(mps and mps.is_available())


def state():
    """accelerate's process state, created once: CPU (gloo) without an accelerator, as the Trainer will use."""
    from datetime import timedelta

    from accelerate import PartialState

    # every collective gives up after the timeout (bounded waits, below); the Trainer reuses this state
    return PartialState(cpu=not accelerator_available(), timeout=timedelta(seconds=collective_timeout()))


def die_with_parent(sig: int | None = None) -> None:
    """Ask the kernel to send this process `sig` (SIGKILL by default) when its parent dies (Linux prctl
    PR_SET_PDEATHSIG; a no-op elsewhere), and exit now if the parent is already gone.

    Why: torchrun starts each worker in a session of its own, so killing the launcher's process group
    (a user's kill -9, a scheduler, the OOM killer) left the ranks training, holding their GPUs and the
    run directory's lock. The launcher sets this for torchrun's agent, and each worker for itself, so
    the job dies with whatever started it; `--resume` then continues from the last checkpoint."""
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, int(sig if sig is not None else signal.SIGKILL), 0, 0, 0)
    if parent == 1 or os.getppid() != parent:  # the parent died before the request: nothing will signal us
        os._exit(1)


def shutdown() -> None:
    """Tear the process group down before the interpreter exits: left to exit-time destructors, a rank
    can abort with "terminate called without an active exception" after its work is done."""
    if world_size() > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank; nothing to do in a single process."""
    if world_size() > 1:
        state().wait_for_everyone()


def _first_error(mine: BaseException | None) -> LmlabError | None:
    """Every rank's error (or None) gathered, and the first one, as an LmlabError, returned on every rank: the
    leaders' failure stops all ranks, instead of leaving the others waiting at a barrier forever."""
    if world_size() == 1:
        return mine if isinstance(mine, LmlabError) or mine is None else LmlabError(str(mine))
    import torch.distributed as dist

    state()
    described = None
    if mine is not None:
        described = (mine.message, mine.file, mine.line, mine.field, mine.hint) if isinstance(mine, LmlabError) \
            else (f"rank {rank()} failed: {type(mine).__name__}: {mine}", None, None, None, None)
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, described)
    found = next((p for p in parts if p is not None), None)
    if found is None:
        return None
    message, file, line, field, hint = found
    return LmlabError(message, file=file, line=line, field=field, hint=hint)


@contextmanager
def main_first(per_node: bool = False) -> Iterator[bool]:
    """The leader (rank 0, or each node's local rank 0 with `per_node`) does the work inside first and writes
    it; then the others run it and read what it wrote. An error in the leader's part is raised on every rank
    (the one helper for "rank 0 does it, everyone waits, errors reach everyone")."""
    leader = local_rank() == 0 if per_node else is_main()
    if world_size() > 1 and not leader:
        error = _first_error(None)  # wait for the leaders' verdict
        if error is not None:
            raise error
    try:
        yield leader
    except BaseException as exc:
        if world_size() > 1 and leader:
            _first_error(exc)
        raise
    if world_size() > 1 and leader:
        _first_error(None)


def shard(items) -> list:
    """This rank's share of `items` (a list or a datasets table): every world_size-th item from its rank on,
    all of them in one process."""
    return [items[i] for i in range(rank(), len(items), world_size())]


def unshard(mine: list) -> list:
    """The inverse of `shard` across ranks: every rank's share gathered and put back in the original order,
    so all ranks hold the same full list (picklable items; one all-gather over accelerate's process group)."""
    if world_size() == 1:
        return list(mine)
    import torch.distributed as dist

    state()
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, mine)
    return [parts[i % len(parts)][i // len(parts)] for i in range(sum(len(p) for p in parts))]


def map_in_chunks(items, size: int, work) -> list:
    """`work(chunk, start)` over consecutive chunks of `size` items (each call returns one result per item);
    under a launcher each rank takes every world_size-th chunk, and every rank gets all the results, in order.

    Why chunks and not items: a chunk is the batch the work runs as, so its composition (padding, and the
    sampling seed `work` derives from `start`) is the same on any number of processes, and a result
    computed on N processes is identical to one process's. Every rank must call it (it gathers)."""
    chunks = [(start, [items[i] for i in range(start, min(start + size, len(items)))])  # a list or a datasets table
              for start in range(0, len(items), size)]
    my_chunks = shard(chunks)
    global _items_here
    _items_here += sum(len(chunk) for _, chunk in my_chunks)
    return [result for results in unshard([work(chunk, start) for start, chunk in my_chunks]) for result in results]


_items_here = 0  # items this process has worked on through map_in_chunks


def items_per_rank() -> list[int]:
    """How many items each rank has worked on through `map_in_chunks` so far, in rank order (every rank
    must call it): how `lmlab eval --json` shows that the items were split."""
    return unshard([_items_here])


# Bounded waits. Every collective (gradient all-reduce, barrier, gather) gives up after the process group's
# timeout, so a dead or stuck rank cannot hang the others; lmlab's launcher then names the rank that failed,
# from a small status file each worker keeps in a directory it gives them (LMLAB_RANK_STATUS).
TIMEOUT_ENV = "LMLAB_COLLECTIVE_TIMEOUT"  # seconds; the launcher sets it from train.collective_timeout
STATUS_ENV = "LMLAB_RANK_STATUS"
STALL_ENV = "LMLAB_TEST_STALL"  # tests only: "RANK:STEP" makes that rank hang at the start of that step
DEFAULT_TIMEOUT = 1800  # HF's ddp_timeout: room for rank 0's longest lone work (a large token store, say)
_status: dict = {}


def collective_timeout() -> int:
    return int(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))


def report(**fields) -> None:
    """Update this worker's status file (state, stage, step, error) for the launcher; nothing to do in a
    single process or outside lmlab's launcher. Cheap enough for every step: one small file replaced."""
    folder = os.environ.get(STATUS_ENV)
    if not folder or world_size() == 1:
        return
    import json

    _status.update(rank=rank(), **fields)
    path = os.path.join(folder, f"rank{rank()}.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(_status, fh)
    os.replace(path + ".tmp", path)


def watch_worker() -> None:
    """At a worker's start: say it runs, and that it was stopped when the launcher tears the job down."""
    import signal

    report(state="running", stage=None, step=None)

    def stopped(signum, frame):
        report(state="stopped")
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, stopped)


def is_lost_peer(exc: BaseException) -> bool:
    """A collective that failed because another rank did: a timeout, or a peer's closed connection."""
    text = f"{type(exc).__name__}: {exc}"
    return any(s in text for s in ("DistBackendError", "DistNetworkError", "Timed out", "timed out",
                                    "Connection closed", "Connection reset", "Broken pipe", "NCCL error"))


def stall_here(step: int) -> None:
    """The tests' switch: at the start of the step LMLAB_TEST_STALL names, this rank hangs (the others wait
    for it in the step's all-reduce)."""
    if os.environ.get(STALL_ENV) == f"{rank()}:{step}":
        import time

        report(step=step)
        time.sleep(10**6)


FAILURE_ORDER = ("error", "running", "stopped", "waiting")  # which rank's story explains the others'


def failure_line(folder: str, timeout: int) -> str | None:
    """One line naming the rank that failed, its stage and step, from the workers' status files; None when
    every rank finished (or none left a word)."""
    import glob
    import json

    statuses = []
    for path in sorted(glob.glob(os.path.join(folder, "rank*.json"))):
        try:
            with open(path) as fh:
                statuses.append(json.load(fh))
        except (OSError, ValueError):
            continue
    failing = [s for s in statuses if s.get("state") in FAILURE_ORDER]
    if not failing:
        return None
    first = min(failing, key=lambda s: (FAILURE_ORDER.index(s["state"]), s.get("rank", 0)))
    where = f"in stage '{first.get('stage')}'" if first.get("stage") else "before its first stage"
    if first.get("step") is not None:
        where += f" at step {first['step']}"
    how = {"error": f"failed: {first.get('error', '?')}",
           "running": "died without a word (killed: a signal, the OOM killer) or hung",
           "stopped": "stopped responding (stuck) until the launcher stopped it",
           "waiting": "lost contact with the other ranks"}[first["state"]]
    others = "; the other ranks stopped" + (f" within train.collective_timeout ({timeout} s)"
                                            if any(s["state"] == "waiting" for s in statuses) else "")
    return f"rank {first.get('rank')} {where} {how}{others}. Continue with --resume (from the last checkpoint)."
