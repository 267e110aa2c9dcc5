"""One `python -m lmlab.cli ...` process per variant of an ablation, sweep or ensemble, forked from a warm one.

Why: a fresh interpreter spends about 4-5 s of a 2-core machine importing torch and transformers before
it trains anything, so a sweep of 17 tiny variants spent most of its time starting. Here every variant
is forked from one server process that has imported them already (multiprocessing's forkserver; the
server only imports, never runs an op, starts no thread and never touches CUDA, which is what makes
forking it safe) and starts in about a third of the time. Each variant is still a process of its own:
it reads its own environment and working directory, writes its own log, a crash or an out-of-memory
kill takes only that variant down, and its memory goes back when it ends. (As with any multiprocessing
program, a script that calls `run_ablation` and friends keeps its own work under `if __name__ == "__main__":`.)
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import sys
from pathlib import Path

# what every stage imports; a module that fails to import here is simply imported by the variant
PRELOAD = ["torch", "transformers", "transformers.models.llama.modeling_llama", "datasets", "lmlab.cli"]


def visible_gpus() -> list[str]:
    """The CUDA devices the variants share: CUDA_VISIBLE_DEVICES's entries when it is set (empty: none), else
    every device torch counts (counting them does not initialise CUDA in this process)."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [device.strip() for device in given.split(",") if device.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def default_jobs() -> int:
    """Variants at a time: one per GPU when there are GPUs, else a quarter of the cores (threads split)."""
    gpus = visible_gpus()
    return len(gpus) if gpus else max(1, (os.cpu_count() or 1) // 4)


def _context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def _run_cli(args: list[str], log: str, env: dict[str, str], cwd: str) -> None:
    """The child: the parent's directory and environment, stdout and stderr into `log`, then `lmlab ARGS`."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    if env.get("OMP_NUM_THREADS"):  # torch read the variable when the server imported it: set it again
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = ["lmlab", *args]
    runpy.run_module("lmlab.cli", run_name="__main__", alter_sys=True)  # SystemExit's code is the exit code


def start_lmlab(args: list[str], log: Path, env: dict[str, str] | None = None) -> multiprocessing.Process:
    """Start `lmlab ARGS` with its output in `log`; the process's `exitcode` is None until it ends,
    then the command's exit status (negative: killed by that signal)."""
    process = _context().Process(target=_run_cli, args=(list(args), str(log), dict(env or os.environ), os.getcwd()),
                                 daemon=False)
    process.start()
    return process
