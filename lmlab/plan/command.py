"""`lmlab plan`: a typer command that imports only the planner (no torch), so it answers in well under a second."""

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
    global_batch: Optional[int] = typer.Option(None, "--global-batch", help="Sequences per optimizer step."),
    mfu: float = typer.Option(0.40, "--mfu", help="Assumed model-FLOPs utilisation."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    emit: Optional[Path] = typer.Option(None, "--emit", help="Write a runnable recipe for the (pre)training stage."),
    data: Optional[str] = typer.Option(None, "--data", help="Training/domain data for the emitted recipe."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Local checkpoint to continue (CPT)."),
) -> None:
    """Answer: what do I run on these GPUs, how long does it take, and does it fit?"""
    from rich.console import Console

    from lmlab.plan.hardware import parse_gpus
    from lmlab.plan.params import resolve_shape
    from lmlab.plan.planner import make_plan, plan_to_recipe, render

    if method not in (None, "full", "lora", "qlora"):
        raise LmlabError(f"unknown method '{method}'", field="--method", hint="full, lora or qlora")
    count, gpu = parse_gpus(gpus)
    examples = parse_count(sft_examples, "sft-examples")
    result = make_plan(resolve_shape(model), gpu, count, goal=goal, tokens=parse_count(tokens, "tokens"),
                       domain_tokens=parse_count(domain_tokens, "domain-tokens"),
                       unique_tokens=parse_count(unique_tokens, "unique-tokens"),
                       sft_examples=int(examples) if examples else None, seq_len=seq_len,
                       global_batch=global_batch, mfu=mfu, method=method)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        render(result, Console())
    if emit:
        import yaml

        from lmlab.recipe import validate_recipe

        tree = plan_to_recipe(result, name=emit.stem, data=data, checkpoint=checkpoint)
        validate_recipe(tree, file=str(emit))
        emit.write_text(yaml.safe_dump(tree, sort_keys=False))
        typer.echo(f"recipe written to {emit}: run it with `lmlab pretrain {emit}`")
