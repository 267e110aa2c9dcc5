"""torchrun's agent (`python -m torch.distributed.run`), minus its traceback when a worker fails.

torchrun reports a failed worker by raising ChildFailedError out of its main: a traceback of its own
frames and a "root cause" that is the first rank to exit, which for a hung or killed rank is one of the
survivors that gave up waiting. lmlab's launcher (lmlab.cli.launch) says which rank failed, in which
stage and at which step, from the workers' own status files; this entry point leaves that line the last
word and keeps torchrun's exit status.
"""

import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main

if __name__ == "__main__":
    try:
        main()
    except ChildFailedError:
        sys.exit(1)
