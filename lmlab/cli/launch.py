"""`--nproc N` (and `--nnodes`, `--node-rank`, `--master-addr`): run this same command on N processes.

lmlab starts the processes through torchrun, the launcher accelerate also builds
on, or through `accelerate launch --config_file FILE` when `--accelerate-config FILE`
is given; each rank then runs the ordinary command (rank 0 writes, the others wait
at barriers). Under an external `torchrun` or `accelerate launch` (LOCAL_RANK is set)
these flags do nothing, so every way of launching runs the same code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import typer

NprocOption = typer.Option(1, "--nproc", min=1, help="Processes per node (torchrun; e.g. one per GPU).")
NnodesOption = typer.Option(1, "--nnodes", min=1, help="Nodes; with --node-rank and --master-addr on each.")
NodeRankOption = typer.Option(0, "--node-rank", min=0, help="This node's rank (0 .. nnodes - 1).")
MasterOption = typer.Option(None, "--master-addr", help="Address of node 0 (several nodes only).")
PortOption = typer.Option(29500, "--master-port", help="Port on node 0 for the rendezvous.")
AccelerateConfigOption = typer.Option(None, "--accelerate-config", help="Launch through `accelerate launch` with "
                                      "this config file (e.g. configs/accelerate/zero3.yaml).")
FLAGS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port", "--accelerate-config")


# The launchers' argparse reads any later argument that abbreviates one of their own options as theirs
# (lmlab eval's `--n` as torchrun's `--nnodes`), so lmlab's arguments follow a `--`; lmlab.cli.main drops
# it where the launcher passes it on.
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
    cmd = [sys.executable, "-m", "lmlab.cli.agent", f"--nproc_per_node={nproc}"]  # torchrun, quieter on failure
    if nnodes > 1:
        cmd += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={master_addr}",
                f"--master_port={master_port}"]
    else:
        cmd.append("--standalone")  # one node: a free port, no rendezvous address to give
    return [*cmd, "-m", "lmlab.cli", "--", *command_without_launch_flags(argv)]


def accelerate_command(argv: list[str], config: Path, nproc: int, nnodes: int, node_rank: int,
                       master_addr: str | None, master_port: int) -> list[str]:
    """`accelerate launch` with a user's config file; the process counts come from the lmlab flags.

    A config that shards (FSDP, DeepSpeed) needs GPUs: accelerate would drop the sharding on CPU
    without a word, so that is refused here. A DDP config on CPU still goes through accelerate's
    multi-GPU launcher (torchrun underneath; the Trainer then picks gloo): accelerate's `--cpu`
    would start one process, not N."""
    import torch
    import yaml

    from lmlab.errors import LmlabError

    try:
        settings = yaml.safe_load(config.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise LmlabError(f"cannot read the accelerate config ({exc.__class__.__name__})", file=str(config),
                         field="--accelerate-config") from None
    kind = settings.get("distributed_type") if isinstance(settings, dict) else None
    if not kind:
        raise LmlabError("not an accelerate config: no distributed_type", file=str(config), field="distributed_type",
                         hint="write one with `accelerate config`, or start from configs/accelerate/")
    cpu = not torch.cuda.is_available()
    if cpu and kind in ("FSDP", "DEEPSPEED"):
        raise LmlabError(f"distributed_type {kind} shards over GPUs, and none is visible", file=str(config),
                         field="distributed_type", hint="on CPU use configs/accelerate/ddp.yaml (or --nproc alone)")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--num_processes", str(nproc * nnodes), "--num_machines", str(nnodes), "--machine_rank", str(node_rank),
           "--main_process_port", str(master_port)]
    if nnodes > 1:
        cmd += ["--main_process_ip", master_addr]
    return [*cmd, "-m", "lmlab.cli", "--", *command_without_launch_flags(argv)]


def relaunch(nproc: int, nnodes: int, node_rank: int, master_addr: str | None, master_port: int,
             accelerate_config: Path | None = None, timeout: int | None = None) -> None:
    """Start this command on every process and exit with their status; a no-op inside a launched process.

    Every collective of the workers gives up after `timeout` seconds (train.collective_timeout); when the
    job fails, the workers' status files say which rank failed first, in which stage and at which step,
    and that is the one line printed last."""
    if "LOCAL_RANK" in os.environ or (nproc == 1 and nnodes == 1 and accelerate_config is None):
        return
    if nnodes > 1 and not master_addr:
        from lmlab.errors import LmlabError

        raise LmlabError("several nodes need the address of node 0", field="--master-addr")
    if accelerate_config is not None:
        cmd = accelerate_command(sys.argv[1:], accelerate_config, nproc, nnodes, node_rank, master_addr, master_port)
    else:
        cmd = torchrun_command(sys.argv[1:], nproc, nnodes, node_rank, master_addr, master_port)
    import tempfile

    from lmlab.distributed import STATUS_ENV, TIMEOUT_ENV, collective_timeout, die_with_parent, failure_line

    timeout = timeout or collective_timeout()
    with tempfile.TemporaryDirectory(prefix="lmlab-ranks-") as status:
        env = {**os.environ, STATUS_ENV: status, TIMEOUT_ENV: str(timeout)}
        # the agent dies with this process (and each worker with the agent: lmlab.cli.options)
        code = subprocess.call(cmd, preexec_fn=die_with_parent, env=env)
        line = failure_line(status, timeout) if code else None
    if line:
        typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)
