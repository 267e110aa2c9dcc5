"""`lmlab plan`: a typer command that imports only the planner (no torch), so it answers in well under a second;
`--emit` writes the plan as a pipeline, validated as `lmlab run` would validate it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import typer

from lmlab.errors import LmlabError

SUFFIXES = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: Optional[str], name: str) -> Optional[float]:
    """'20B', '1.5T', '300M', '5e9' -> a number; anything else is an error naming the option."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbgt]?)\s*", text.lower())
    if not match:
        raise LmlabError(f"'{text}' is not a count (use e.g. 20B, 300M, 1.5T)", field=f"--{name}")
    return float(match.group(1)) * SUFFIXES[match.group(2)]


def plan(
    model: str = typer.Option(..., "--model", "-m", help="Preset (qwen3-1.7b, llama-3.1-8b, ...), config.json or recipe."),
    gpus: str = typer.Option("1xh100", "--gpus", "-g", help="Count and kind, e.g. 8x4090, 4xH100, a100-80gb."),
    goal: str = typer.Option("pretrain", "--goal", help="pretrain, cpt, sft, domain-expert, general-reasoning."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="Pretraining budget (default: 100x parameters)."),
    domain_tokens: Optional[str] = typer.Option(None, "--domain-tokens", help="Domain tokens for CPT."),
    unique_tokens: Optional[str] = typer.Option(None, "--unique-tokens", help="Unique tokens available."),
    sft_examples: Optional[str] = typer.Option(None, "--sft-examples", help="SFT dataset size."),
    method: Optional[str] = typer.Option(None, "--method", help="Force full, lora or qlora."),
    seq_len: int = typer.Option(2048, "--seq-len"),
    global_batch: Optional[int] = typer.Option(None, "--global-batch", min=1, help="Sequences per optimizer step."),
    mfu: Optional[float] = typer.Option(None, "--mfu", help="MFU (default: measured on the card class, else 0.40)."),
    host_ram: Optional[float] = typer.Option(None, "--host-ram", min=1, max=1e5,
                                             help="CPU memory per node in GB (8 GPUs to a node): CPU offload must "
                                                  "fit in it. Without it the plan prints what offload needs."),
    sharding: Optional[str] = typer.Option(None, "--sharding", help="ddp, zero1, zero2 or zero3 (default: chosen)."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", min=1, max=4096, help="Default: chosen."),
    checkpointing: Optional[str] = typer.Option(None, "--checkpointing", help="on or off (default: as needed)."),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adamw, adamw_8bit or adafactor."),
    precision: str = typer.Option("bf16-mixed", "--precision", help="bf16-mixed, fp32 or bf16 (no fp32 master)."),
    lora_rank: int = typer.Option(16, "--lora-rank", min=1, max=4096, help="LoRA / QLoRA rank."),
    lora_targets: str = typer.Option("all-linear", "--lora-targets", help="all-linear, attention, qv."),
    qlora_bits: int = typer.Option(4, "--qlora-bits", help="QLoRA's base: 4 (NF4) or 8 (LLM.int8)."),
    attention: str = typer.Option("flash", "--attention", help="flash, sdpa or eager (eager keeps the softmax)."),
    loss: str = typer.Option("auto", "--loss", help="Pretraining/CPT loss: auto, full (whole logits), chunks or "
                             "fused (tiles; SFT, DPO and RL always use TRL's fused head)."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel degree within a node (sizing only)."),
    pp: int = typer.Option(1, "--pp", help="Pipeline stages, 1F1B (sizing only)."),
    cp: int = typer.Option(1, "--cp", help="Context-parallel degree, ring attention (sizing only)."),
    allreduce_gbps: Optional[float] = typer.Option(None, "--allreduce-gbps", min=0.1, max=10_000,
                                                   help="NCCL all-reduce bus bandwidth (default: measured figure)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    emit: Optional[Path] = typer.Option(None, "--emit", help="Write the plan as a pipeline `lmlab run` executes."),
    data: Optional[str] = typer.Option(None, "--data", help="Pretraining / domain data for the emitted pipeline."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Local checkpoint the first stage continues."),
    sft_data: Optional[str] = typer.Option(None, "--sft-data", help="Chat data (jsonl) for the emitted SFT stage."),
    rl_prompts: Optional[str] = typer.Option(None, "--rl-prompts", help="Prompts (jsonl) for the emitted RL stage."),
) -> None:
    """Answer: what do I run on these GPUs, how long does it take, and does it fit?"""
    from lmlab.console import console as shared_console
    from lmlab.plan.hardware import parse_gpus
    from lmlab.plan.params import resolve_shape
    from lmlab.plan.planner import make_plan, render

    (count, gpu), examples = parse_gpus(gpus), parse_count(sft_examples, "sft-examples")
    setup, forced = training_options(sharding, micro_batch, checkpointing, optimizer, precision, lora_rank,
                                     lora_targets, attention, qlora_bits, method)
    setup.update(tensor_parallel=tp, pipeline_parallel=pp, context_parallel=cp)  # checked against the model by make_plan
    result = make_plan(resolve_shape(model), gpu, count, goal=goal, tokens=parse_count(tokens, "tokens"),
                       domain_tokens=parse_count(domain_tokens, "domain-tokens"),
                       unique_tokens=parse_count(unique_tokens, "unique-tokens"),
                       sft_examples=int(examples) if examples else None, seq_len=seq_len,
                       global_batch=global_batch, mfu=mfu, method=method, host_ram_gb=host_ram, setup=setup,
                       forced=forced, allreduce_gbps=allreduce_gbps, loss=loss)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        render(result, shared_console())
    if emit:
        _emit(result, emit, data=data, checkpoint=checkpoint, sft_data=sft_data, rl_prompts=rl_prompts)


def _emit(result, emit: Path, **sources) -> None:
    """Write the pipeline, then its notes and the command that runs it."""
    from lmlab.plan.planner import launch_command

    for note in emit_pipeline(result, emit, **sources):
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"pipeline written to {emit}: run it with `{launch_command(result, str(emit))}`")


def _one_of(value: str, allowed: tuple[str, ...], flag: str) -> str:
    if value not in allowed:
        raise LmlabError(f"unknown value '{value}'", field=flag, hint=", ".join(allowed))
    return value


def training_options(sharding, micro_batch, checkpointing, optimizer, precision, lora_rank, lora_targets, attention,
                     qlora_bits=4, method=None):
    """The plan options as the planner's TrainSetup fields and its forced choices, each value checked."""
    from lmlab.plan.memory import LORA_TARGETS, OPTIMIZER_BYTES
    from lmlab.plan.strategy import Forced

    if method not in (None, "full", "lora", "qlora"):
        raise LmlabError(f"unknown method '{method}'", field="--method", hint="full, lora or qlora")
    precision = _one_of(precision, ("bf16-mixed", "fp32", "bf16"), "--precision")
    setup = {"optimizer": _one_of(optimizer, tuple(OPTIMIZER_BYTES), "--optimizer"),
             "precision_bytes": 4 if precision == "fp32" else 2, "master_weights": precision != "bf16",
             "lora_rank": lora_rank, "lora_targets": _one_of(lora_targets, tuple(LORA_TARGETS), "--lora-targets"),
             "attention": _one_of(attention, ("flash", "sdpa", "eager"), "--attention"),
             "quant_bits": int(_one_of(str(qlora_bits), ("4", "8"), "--qlora-bits"))}
    forced = Forced(sharding=_one_of(sharding, ("ddp", "zero1", "zero2", "zero3"), "--sharding") if sharding else None,
                    micro_batch=micro_batch,
                    checkpointing={"on": True, "off": False}[_one_of(checkpointing, ("on", "off"), "--checkpointing")]
                    if checkpointing else None)
    return setup, forced


def emit_pipeline(plan, path, data: str | None = None, checkpoint: str | None = None,
                  sft_data: str | None = None, rl_prompts: str | None = None) -> list[str]:
    """Write the plan's pipeline YAML (validated as `lmlab run` would) with the notes as a header."""
    from pathlib import Path

    import yaml

    from lmlab.pipeline import Pipeline, plan_stages
    from lmlab.plan.planner import launch_command, plan_to_pipeline
    from lmlab.loading import validate_recipe

    path = Path(path)
    tree, notes = plan_to_pipeline(plan, name=path.stem, data=data, checkpoint=checkpoint, sft_data=sft_data,
                                   rl_prompts=rl_prompts)
    placeholder = {s["model"]["from_pretrained"] for s in tree["stages"] if "from_pretrained" in s.get("model", {})}
    plan_stages(validate_recipe(tree, str(path), model=Pipeline), str(path), assume_exists=placeholder)
    header = [f"# lmlab plan: {plan.goal} for {plan.model.name} on {plan.num_gpus} x {plan.gpu.name}; "
              f"run it with `{launch_command(plan, path.name)}`"] + [f"# NOTE {n}" for n in notes]
    path.write_text("\n".join(header) + "\n" + yaml.safe_dump(tree, sort_keys=False))
    return notes
