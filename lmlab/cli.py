"""The `lmlab` command line: it parses arguments and calls into the package, nothing more.

Heavy libraries (torch, transformers, datasets) are imported inside the commands
that need them, so `lmlab --help` and `lmlab plan` start instantly.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from lmlab.errors import LmlabError

app = typer.Typer(help="Plan and run the training lifecycle of a language model by recipe.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
tokenizer_app = typer.Typer(help="Train and measure tokenizers.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")

SetOption = typer.Option(None, "--set", "-s", help="Override a recipe key, e.g. --set optim.lr=3e-4 (repeatable).")


def user_errors(fn: Callable) -> Callable:
    """Print an LmlabError as one clear line and exit 2, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LmlabError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper


from lmlab.plan.command import plan as _plan  # noqa: E402 - light: typer and the stdlib only

app.command("plan")(user_errors(_plan))


ResumeOption = typer.Option(False, "--resume", help="Continue from the last complete checkpoint.")
OverwriteOption = typer.Option(False, "--overwrite", help="Delete an existing run directory first.")


def _run_stage(stage: str, recipe: Path, overrides: Optional[List[str]], resume: bool, overwrite: bool) -> None:
    from lmlab.recipe import load_recipe

    loaded = load_recipe(recipe, [*(overrides or []), f"stage={stage}"])
    if stage == "sft":
        from lmlab.stages.sft import run_sft

        run_sft(loaded, resume=resume, overwrite=overwrite)
    else:
        from lmlab.stages.pretrain import run_pretrain

        run_pretrain(loaded, resume=resume, overwrite=overwrite)


@app.command()
@user_errors
def pretrain(recipe: Path = typer.Argument(..., help="YAML recipe."), set_: Optional[List[str]] = SetOption,
             resume: bool = ResumeOption, overwrite: bool = OverwriteOption) -> None:
    """Pretrain a model from a recipe; prints where the HF checkpoint is."""
    _run_stage("pretrain", recipe, set_, resume, overwrite)


@app.command()
@user_errors
def cpt(recipe: Path = typer.Argument(..., help="YAML recipe with model.from_pretrained and data.replay."),
        set_: Optional[List[str]] = SetOption, resume: bool = ResumeOption, overwrite: bool = OverwriteOption) -> None:
    """Continue pretraining on domain data with an exact share of general replay (default 16%)."""
    _run_stage("cpt", recipe, set_, resume, overwrite)


@app.command()
@user_errors
def sft(recipe: Path = typer.Argument(..., help="YAML recipe with model.from_pretrained and chat data."),
        set_: Optional[List[str]] = SetOption, resume: bool = ResumeOption, overwrite: bool = OverwriteOption) -> None:
    """Supervised fine-tuning (full, LoRA or QLoRA) on chat records, loss on assistant tokens only."""
    _run_stage("sft", recipe, set_, resume, overwrite)


@app.command()
@user_errors
def export(adapter: Path = typer.Argument(..., help="A LoRA adapter directory written by `lmlab sft`."),
           out: Path = typer.Option(..., "--out", "-o", help="Directory for the merged HF checkpoint.")) -> None:
    """Merge a LoRA adapter into its base model, with the tokenizer and chat template."""
    from lmlab.stages.sft import export_adapter

    typer.echo(f"merged checkpoint: {export_adapter(adapter, out)}")


@app.command("eval")
@user_errors
def eval_(checkpoint: Path = typer.Argument(..., help="An HF checkpoint directory (with its tokenizer)."),
          tasks: str = typer.Option("math_id,math_ood,general_cloze", "--tasks",
                                    help="Comma-separated embedded task names or task YAML files."),
          n: int = typer.Option(200, "--n", help="Items per embedded task."),
          samples: int = typer.Option(1, "--samples", help="Samples per prompt for maj@k and pass@k."),
          out: Optional[Path] = typer.Option(None, "--out", help="Also write the results as JSON.")) -> None:
    """Score a checkpoint on cloze and generative tasks."""
    import json

    from rich.console import Console
    from rich.table import Table

    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.evaluate.tasks import load_task, run_task
    from lmlab.models.build import load_model

    loaded = [load_task(spec.strip(), n) for spec in tasks.split(",") if spec.strip()]  # bad tasks fail first
    tokenizer = load_tokenizer(checkpoint)
    model = load_model(checkpoint)
    results: dict[str, float] = {}
    for task in loaded:
        results.update(run_task(model, tokenizer, task, samples=samples))
    table = Table(title=f"evaluation of {checkpoint}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in results.items():
        table.add_row(key, f"{value:.4f}")
    Console().print(table)
    if out:
        out.write_text(json.dumps(results, indent=2))


@app.command()
@user_errors
def report(run_dir: Path = typer.Argument(..., help="A run directory, or a directory of runs (e.g. runs/)."),
           out: Optional[Path] = typer.Option(None, "--out", help="Where report.md and its PNGs go.")) -> None:
    """Markdown and PNG plots: losses, LR, grad norm, task metrics, ORM score vs accuracy (r^2)."""
    from lmlab.report import write_report

    typer.echo(f"report: {write_report(run_dir, out)}")


@tokenizer_app.command("train")
@user_errors
def tokenizer_train(
    recipe: Path = typer.Argument(..., help="YAML recipe whose tokenizer and data blocks are used."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the HF tokenizer."),
    set_: Optional[List[str]] = SetOption,
) -> None:
    """Train a byte-level BPE (digits split, ChatML template) on a recipe's data."""
    from lmlab.data.pretrain_data import load_documents
    from lmlab.data.tokenizer import save_tokenizer, train_tokenizer
    from lmlab.recipe import load_recipe

    r = load_recipe(recipe, set_)
    docs = load_documents(r.tokenizer.train_sources or r.data.train, streaming=True, seed=r.seed)
    tok = train_tokenizer((row["text"] for row in docs), vocab_size=r.tokenizer.vocab_size,
                          min_frequency=r.tokenizer.min_frequency, max_bytes=r.tokenizer.max_train_bytes)
    save_tokenizer(tok, out)
    typer.echo(f"tokenizer with {len(tok):,} tokens saved to {out}")


@tokenizer_app.command("eval")
@user_errors
def tokenizer_eval(
    tokenizer: Path = typer.Argument(..., help="HF tokenizer directory."),
    source: str = typer.Option("general", "--source", help="Text to measure on: general, math, a path, hub:NAME."),
    against: Optional[Path] = typer.Option(None, "--against", help="A second tokenizer directory to compare."),
    docs: int = typer.Option(500, "--docs", help="Documents to measure on."),
) -> None:
    """Fertility (tokens/word), continued-word proportion and bytes/token."""
    from rich.console import Console
    from rich.table import Table

    from lmlab.data.sources import load_source
    from lmlab.data.tokenizer import compare_tokenizers, load_tokenizer, tokenizer_metrics
    from lmlab.recipe import SourceSpec

    spec = SourceSpec.model_validate(source)
    texts = [row["text"] for row in load_source(spec, streaming=True).take(docs)]
    tokenizers = {str(tokenizer): load_tokenizer(tokenizer)}
    if against:
        tokenizers[str(against)] = load_tokenizer(against)
    table = Table(title=f"tokenizer metrics on {len(texts)} documents of {source}")
    table.add_column("metric")
    results = {name: tokenizer_metrics(tok, texts) for name, tok in tokenizers.items()}
    for name in results:
        table.add_column(name, justify="right")
    for key in ("fertility", "continued_words", "bytes_per_token", "tokens", "words", "bytes"):
        table.add_row(key, *[f"{r[key]:.4f}" if isinstance(r[key], float) else f"{r[key]:,}" for r in results.values()])
    Console().print(table)
    if against:
        ratios = compare_tokenizers(*tokenizers.values(), texts)
        typer.echo(f"ratios (first / second): {ratios.get('ratios', ratios)}")


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
