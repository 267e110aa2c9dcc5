"""The one console every command prints through.

Output that goes to a file (nohup, slurm, CI logs) keeps each log line on one
line: the console only wraps and animates on a terminal. Under several processes
only rank 0 speaks, so a step is logged once. `--quiet` silences everything but
errors. HF / datasets progress bars and known deprecation chatter are switched
off here once, since lmlab's own progress bar says the same.
"""

from __future__ import annotations

import os
import sys
import warnings
from functools import lru_cache

QUIET_ENV = "LMLAB_QUIET"


def console(stderr: bool = False):
    """The console on the current standard output (or error): one per stream, so a caller that swaps
    sys.stdout (a test runner capturing a command) never leaves lmlab printing to a closed one."""
    return _console_on(sys.stderr if stderr else sys.stdout)


@lru_cache(maxsize=None)
def _console_on(stream):
    from rich.console import Console

    from lmlab.distributed import is_main

    terminal = stream.isatty()
    quiet = not is_main() or os.environ.get(QUIET_ENV) == "1"
    return Console(file=stream, soft_wrap=not terminal, force_terminal=terminal or None,
                   width=None if terminal else 120, quiet=quiet, highlight=False)  # soft wrap: lines never break


def on_terminal() -> bool:
    return sys.stdout.isatty() and console().is_terminal


LIBRARY_QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
                     "TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
                     "DATASETS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}


def quiet_libraries_env() -> None:
    """The libraries' own switches, as environment variables: cheap, and in force before they are imported."""
    for key, value in LIBRARY_QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


def silence_libraries() -> None:
    """Turn off the progress bars and warnings of transformers, datasets and TRL (ours replace them)."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=".*torch.distributed process group is initialized.*")
