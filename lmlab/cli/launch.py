"""`--nproc N` (and `--nnodes`, `--node-rank`, `--master-addr`): run this same command on N processes.

lmlab starts the processes through torchrun, the launcher accelerate also builds
on; each rank then runs the ordinary command (rank 0 writes, the others wait at
barriers). Under an external `torchrun` or `accelerate launch` (LOCAL_RANK is set)
these flags do nothing, so both ways of launching run the same code.
"""

from __future__ import annotations

import os
import subprocess
import sys

import typer

NprocOption = typer.Option(1, "--nproc", min=1, help="Processes per node (torchrun; e.g. one per GPU).")
NnodesOption = typer.Option(1, "--nnodes", min=1, help="Nodes; with --node-rank and --master-addr on each.")
NodeRankOption = typer.Option(0, "--node-rank", min=0, help="This node's rank (0 .. nnodes - 1).")
MasterOption = typer.Option(None, "--master-addr", help="Address of node 0 (several nodes only).")
PortOption = typer.Option(29500, "--master-port", help="Port on node 0 for the rendezvous.")
FLAGS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port")


def command_without_launch_flags(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in FLAGS:
            skip = True
        elif not arg.startswith(tuple(f"{f}=" for f in FLAGS)):
            out.append(arg)
    return out


def torchrun_command(argv: list[str], nproc: int, nnodes: int, node_rank: int, master_addr: str | None,
                     master_port: int) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes > 1:
        if not master_addr:
            from lmlab.errors import LmlabError

            raise LmlabError("several nodes need the address of node 0", field="--master-addr")
        cmd += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={master_addr}",
                f"--master_port={master_port}"]
    else:
        cmd.append("--standalone")  # one node: a free port, no rendezvous address to give
    return [*cmd, "-m", "lmlab.cli", *command_without_launch_flags(argv)]


def relaunch(nproc: int, nnodes: int, node_rank: int, master_addr: str | None, master_port: int) -> None:
    """Start this command on every process and exit with their status; a no-op inside a launched process."""
    if (nproc == 1 and nnodes == 1) or "LOCAL_RANK" in os.environ:
        return
    cmd = torchrun_command(sys.argv[1:], nproc, nnodes, node_rank, master_addr, master_port)
    raise typer.Exit(subprocess.call(cmd))
