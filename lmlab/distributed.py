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
    from accelerate import PartialState

    return PartialState(cpu=not accelerator_available())


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
