"""The `lmlab` command line: it parses arguments and calls into the package, nothing more.

Heavy libraries (torch, transformers, datasets) are imported inside the commands
that need them, so `lmlab --help` and `lmlab plan` start instantly.
"""

from __future__ import annotations

import errno
import functools
from contextlib import contextmanager
import os
from pathlib import Path
from typing import Callable, List, Optional

import typer

from lmlab.cli.launch import (AccelerateConfigOption, MasterOption, NnodesOption, NodeRankOption, NprocOption,
                              PortOption, relaunch)
from lmlab.errors import LmlabError
from lmlab.recipe import STAGES

app = typer.Typer(help="Plan and run the training lifecycle of a language model by recipe.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
tokenizer_app = typer.Typer(help="Train and measure tokenizers.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")

SetOption = typer.Option(None, "--set", "-s", help="Override a recipe key, e.g. --set optim.lr=3e-4 (repeatable).")


DEBUG_ENV = "LMLAB_DEBUG"
OS_REASONS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
              errno.EACCES: "permission denied", errno.EROFS: "the file system is read-only"}


def _version(value: bool) -> None:
    if value:
        import lmlab

        typer.echo(f"lmlab {lmlab.__version__}")
        raise typer.Exit()


@app.callback()
def options(quiet: bool = typer.Option(False, "--quiet", "-q", help="Print errors only."),
            debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error."),
            version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                         help="Print the version and exit.")) -> None:
    """Plan and run the training lifecycle of a language model by recipe."""
    from lmlab.console import quiet_libraries_env

    if "LOCAL_RANK" in os.environ:  # a worker of torchrun / accelerate launch: it dies with its agent
        from lmlab.distributed import die_with_parent, watch_worker

        die_with_parent()
        watch_worker()  # and keeps a status file from which lmlab's launcher names a rank that fails
    quiet_libraries_env()  # HF / datasets bars and chatter off for every command, before they are imported
    if quiet:
        os.environ["LMLAB_QUIET"] = "1"
    if debug:
        os.environ[DEBUG_ENV] = "1"


def user_errors(fn: Callable) -> Callable:
    """Print an error the user can fix as one line (`error: FILE:LINE: FIELD: what (hint)`) and exit 2.

    That covers lmlab's own errors and the machine's: a full disk or a read-only directory
    names the path. `--debug` shows the traceback instead.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from lmlab.distributed import is_lost_peer, report

        rank = os.environ.get("RANK", "0")  # under several processes, say which one failed
        try:
            return fn(*args, **kwargs)
        except (LmlabError, OSError) as exc:
            report(state="error", error=str(exc)[:300])
            if os.environ.get(DEBUG_ENV) == "1":
                raise
            if isinstance(exc, OSError) and exc.errno not in OS_REASONS:
                raise
            message = str(exc) if isinstance(exc, LmlabError) else \
                f"{exc.filename or '?'}: {OS_REASONS[exc.errno]} ({exc.strerror})"
            typer.secho(("error: " if rank == "0" else f"[rank {rank}] error: ") + message, fg=typer.colors.RED,
                        err=True)
            raise typer.Exit(2) from None
        except Exception as exc:
            if not is_lost_peer(exc) or "LOCAL_RANK" not in os.environ:
                report(state="error", error=f"{type(exc).__name__}: {exc}"[:300])
                raise
            # another rank failed or hung: this one's collective gave up; the launcher names the rank
            report(state="waiting", error=str(exc)[:300])
            if os.environ.get(DEBUG_ENV) == "1":
                raise
            typer.secho(f"[rank {rank}] stopped: another rank stopped answering ({str(exc).splitlines()[0][:160]})",
                        fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None

    return wrapper


from lmlab.cli.plan import plan as _plan  # noqa: E402 - light: typer and the stdlib only

app.command("plan")(user_errors(_plan))

from lmlab.cli import chat as _chat  # noqa: E402 - light: typer only until a command runs

app.command("chat")(user_errors(_chat.chat))
app.command("generate")(user_errors(_chat.generate))

from lmlab.cli import data as _data  # noqa: E402 - light: typer only until a command runs

data_app = typer.Typer(help="Token stores: prepare them ahead of a run, list, inspect and prune the cache.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")
for _name in ("prepare", "ls", "rm", "inspect"):
    data_app.command(_name)(user_errors(getattr(_data, _name)))


ResumeOption = typer.Option(False, "--resume", help="Continue from the last complete checkpoint.")
OverwriteOption = typer.Option(False, "--overwrite", help="Delete an existing run directory first.")
ForceOption = typer.Option(False, "--force", help="With --resume: continue even though the recipe changed.")


def _run_stage(stage: str, recipe: Path, overrides: Optional[List[str]], resume: bool, overwrite: bool,
               force: bool = False) -> None:
    from lmlab.loading import load_recipe
    from lmlab.stages import run_stage

    loaded = load_recipe(recipe, [*(overrides or []), f"stage={stage}"])
    with errors_about(recipe):
        run_stage(loaded, resume=resume, overwrite=overwrite, force=force)


@contextmanager
def errors_about(path: Path):
    """An error that names no file (a recipe field's value, found wrong later) is about this recipe."""
    try:
        yield
    except LmlabError as exc:
        if exc.file is None and exc.field and not exc.field.startswith("--"):
            raise LmlabError(exc.message, file=str(path), field=exc.field, hint=exc.hint) from None
        raise


@app.command()
@user_errors
def run(recipe: Path = typer.Argument(..., help="A pipeline recipe: `stages:` in order (see recipes/quickstart.yaml)."),
        set_: Optional[List[str]] = SetOption,
        dry_run: bool = typer.Option(False, "--dry-run", help="Validate and show the stages; train nothing."),
        nproc: int = NprocOption, nnodes: int = NnodesOption, node_rank: int = NodeRankOption,
        master_addr: Optional[str] = MasterOption, master_port: int = PortOption,
        accelerate_config: Optional[Path] = AccelerateConfigOption) -> None:
    """Run a whole lifecycle: each stage feeds the next; re-running skips finished stages and resumes."""
    from lmlab.pipeline import describe, load_pipeline, run_pipeline

    if not dry_run:
        _, planned = load_pipeline(recipe, set_)  # a bad pipeline fails once, here, not on every rank
        timeout = max((p.recipe.train.collective_timeout for p in planned if hasattr(p.recipe, "train")), default=None)
        relaunch(nproc, nnodes, node_rank, master_addr, master_port, accelerate_config, timeout=timeout)
    if dry_run:
        pipeline, planned = load_pipeline(recipe, set_)
        typer.echo(f"{pipeline.name} -> {pipeline.run_dir}")
        for line in describe(planned):
            typer.echo(f"  {line}")
        return
    with errors_about(recipe):
        run_pipeline(recipe, set_)


@app.command()
@user_errors
def ablate(recipe: Path = typer.Argument(..., help="A stage recipe or a pipeline recipe."),
           grid: List[str] = typer.Option(..., "--grid", help="key=v1,v2,... (repeatable; e.g. sft.epochs=1,2,4)."),
           seeds: int = typer.Option(1, "--seeds", min=1, help="Seeds per grid point."),
           jobs: Optional[int] = typer.Option(None, "--jobs", min=1, help="Runs at a time (default: one per GPU, else cores / 4)."),
           set_: Optional[List[str]] = SetOption) -> None:
    """Run grid x seeds variants, then a mean ± std table per metric and plots against the swept value."""
    from lmlab.experiments.ablate import run_ablation

    out = run_ablation(recipe, grid, seeds, jobs, set_)
    typer.echo(f"ablation: {out / 'ablation.md'}")


def _stage_command(stage: str, recipe_help: str, summary: str) -> Callable:
    """One command per stage of `lmlab.recipe.STAGES`: a recipe, --set, --resume, --overwrite."""
    def command(recipe: Path = typer.Argument(..., help=recipe_help), set_: Optional[List[str]] = SetOption,
                resume: bool = ResumeOption, overwrite: bool = OverwriteOption, force: bool = ForceOption,
                nproc: int = NprocOption, nnodes: int = NnodesOption, node_rank: int = NodeRankOption,
                master_addr: Optional[str] = MasterOption, master_port: int = PortOption,
                accelerate_config: Optional[Path] = AccelerateConfigOption,
                dry_run: bool = typer.Option(False, "--dry-run", help="Check every input and show the model, "
                                             "budget, memory and time; train and write nothing.")) -> None:
        from lmlab.loading import load_recipe

        loaded = load_recipe(recipe, [*(set_ or []), f"stage={stage}"])  # a bad recipe fails once, before any launch
        if dry_run:
            from lmlab.console import silence_libraries
            from lmlab.stages.dryrun import describe

            silence_libraries()
            if nproc * nnodes > 1:
                os.environ.setdefault("WORLD_SIZE", str(nproc * nnodes))  # the batch and memory of that many
            with errors_about(recipe):
                for line in describe(loaded):
                    typer.echo(line)
            return
        relaunch(nproc, nnodes, node_rank, master_addr, master_port, accelerate_config,
                 timeout=loaded.train.collective_timeout)
        _run_stage(stage, recipe, set_, resume, overwrite, force)

    command.__doc__ = summary
    return user_errors(command)


for _stage, (_recipe_help, _summary) in STAGES.items():
    app.command(_stage)(_stage_command(_stage, _recipe_help, _summary))


@app.command()
@user_errors
def ensemble(recipe: Path = typer.Argument(..., help="A stage recipe; members differ by seed (init, data order)."),
             members: int = typer.Option(4, "--members", "-k", help="Number of members K."),
             jobs: Optional[int] = typer.Option(None, "--jobs", min=1, help="Members trained at a time."),
             combine: str = typer.Option("logits", "--combine", help="Average `logits` or `logprobs`."),
             set_: Optional[List[str]] = SetOption) -> None:
    """Train K members and save an ensemble (averaged logits) that eval and distill load like a checkpoint."""
    from lmlab.experiments.ensemble import train_ensemble

    if combine not in ("logits", "logprobs"):
        raise LmlabError(f"unknown combine '{combine}'", field="--combine", hint="logits or logprobs")
    typer.echo(f"ensemble: {train_ensemble(recipe, members, jobs, set_, combine)}")


@app.command()
@user_errors
def fit(points: Path = typer.Argument(..., help="A .csv or .jsonl file of points."),
        x: str = typer.Option("params", "--x", help="Column of the scaled quantity (parameters N, members K, tokens D)."),
        y: str = typer.Option("loss", "--y", help="Column of the loss."),
        group: Optional[str] = typer.Option(None, "--group", help="Column naming the recipe of each point."),
        efficiency: Optional[str] = typer.Option(None, "--efficiency",
                                                 help="BASELINE,OTHER: data efficiency of OTHER over BASELINE "
                                                      "(x must be data size)."),
        bootstrap: int = typer.Option(200, "--bootstrap", min=0, help="Bootstrap refits for the 95% intervals."),
        out: Optional[Path] = typer.Option(None, "--out", help="PNG of points, fits and asymptotes.")) -> None:
    """Fit L(x) = A / x^alpha + E per recipe, with bootstrap intervals and the asymptote E (Kotha et al.)."""
    from lmlab.scaling.fit import fit_points

    for line in fit_points(points, x, y, group, efficiency, bootstrap, out):
        typer.echo(line)


@app.command()
@user_errors
def sweep(recipe: Path = typer.Argument(..., help="A stage recipe with a validation split."),
          grid: Optional[List[str]] = typer.Option(None, "--grid", help="key=v1,v2 to replace a default coordinate "
                                                   "(optim.weight_decay, optim.lr with x-multiples, train.epochs)."),
          rounds: int = typer.Option(2, "--rounds", min=1, help="Passes of coordinate descent."),
          extend: int = typer.Option(1, "--extend", min=0, help="Rungs a ladder may grow past an end where its "
                                     "best value sits (geometric: epochs 16 -> 32)."),
          jobs: Optional[int] = typer.Option(None, "--jobs", min=1, help="Runs at a time."),
          set_: Optional[List[str]] = SetOption) -> None:
    """Coordinate descent over weight decay, LR and epochs for fixed data and model (Kotha et al.)."""
    from lmlab.experiments.ablate import parse_grid
    from lmlab.experiments.sweep import DEFAULT_GRID, run_sweep

    chosen = {**DEFAULT_GRID, **(parse_grid(grid) if grid else {})}
    summary = run_sweep(recipe, chosen, rounds, jobs, set_, extend)
    best = summary["best"]
    typer.echo(f"best of {len(summary['runs'])} runs: {best['config']} (eval_loss {best['eval_loss']:.4f})")


@app.command()
@user_errors
def study(path: Path = typer.Argument(..., help="A study file, e.g. recipes/data_constrained_small.yaml."),
          set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Override a study key, e.g. --set "
                                                   "seeds=5 or --set base.train.tokens=2e8 (repeatable): the same "
                                                   "study, larger on a GPU.")) -> None:
    """Reproduce a paper's findings from one study file; finished runs are reused, and the report says per
    finding whether it reproduced."""
    from lmlab.experiments.studies import run_study

    typer.echo(f"report: {run_study(path, set_)}")


@app.command()
@user_errors
def pairs(checkpoint: Path = typer.Argument(..., help="The policy: an HF checkpoint directory."),
          prompts: str = typer.Option("math", "--prompts", help="`math` (in-domain generator) or a prompts jsonl."),
          n: int = typer.Option(200, "--n", min=1, help="Prompts to sample (math)."),
          samples: int = typer.Option(4, "--samples", "-k", min=2, help="Responses per prompt."),
          scorer: str = typer.Option("math_exact", "--scorer", help="A verifier or a reward-model directory."),
          temperature: float = typer.Option(1.0, "--temperature"),
          seed: int = typer.Option(0, "--seed"),
          out: Path = typer.Option(..., "--out", "-o", help="Where the pairs jsonl goes.")) -> None:
    """Sample K responses per prompt, score them, and write best-vs-worst pairs (ties dropped, counted)."""
    from lmlab.evaluate.onpolicy import pairs_file

    stats = pairs_file(checkpoint, prompts, n, samples, scorer, temperature, seed, out)
    typer.echo(f"{stats.pairs} pairs from {stats.prompts} prompts ({stats.ties_dropped} ties dropped; mean best "
               f"{stats.mean_best:.3f}, worst {stats.mean_worst:.3f}) -> {out}")


@app.command()
@user_errors
def export(adapter: Path = typer.Argument(..., help="A LoRA adapter directory written by `lmlab sft`."),
           out: Path = typer.Option(..., "--out", "-o", help="Directory for the merged HF checkpoint.")) -> None:
    """Merge a LoRA adapter into its base model, with the tokenizer and chat template."""
    from lmlab.artifacts import export_adapter

    typer.echo(f"merged checkpoint: {export_adapter(adapter, out)}")


@app.command("eval")
@user_errors
def eval_(checkpoints: list[Path] = typer.Argument(..., help="An HF checkpoint directory (with its tokenizer); "
                                                  "give two to compare them item by item (second - first)."),
          tasks: str = typer.Option("math_id,math_ood,general_cloze", "--tasks",
                                    help="Comma-separated embedded task names or task YAML files."),
          n: int = typer.Option(500, "--n", min=1, help="Items per embedded task."),
          samples: int = typer.Option(1, "--samples", min=1, help="Samples per prompt for maj@k and pass@k."),
          orm: Optional[str] = typer.Option(None, "--orm", help="ORM score of the samples: a verifier "
                                            "(math_exact) or a reward-model directory."),
          temperature: float = typer.Option(0.8, "--temperature",
                                            help="Sampling temperature of the samples (RL's own objective is "
                                            "the reward at its training temperature)."),
          as_json: bool = typer.Option(False, "--json", help="Print the results as JSON (value, ci_low, ci_high, "
                                       "n per metric) instead of a table."),
          out: Optional[Path] = typer.Option(None, "--out", help="Also write the results as JSON."),
          nproc: int = NprocOption, nnodes: int = NnodesOption, node_rank: int = NodeRankOption,
          master_addr: Optional[str] = MasterOption, master_port: int = PortOption,
          accelerate_config: Optional[Path] = AccelerateConfigOption) -> None:
    """Score a checkpoint on cloze and generative tasks, each score with its 95% interval; or two, paired.
    With --nproc N each process scores 1/N of the items and the results equal one process's."""
    import json

    from lmlab.console import console as shared_console
    from lmlab.distributed import is_main, items_per_rank, world_size
    from lmlab.evaluate.compare import comparison_table, stage_changes
    from lmlab.evaluate.evaluator import evaluate_checkpoint
    from lmlab.evaluate.tasks import load_task
    from lmlab.models.build import check_checkpoint
    from lmlab.stats import Estimate

    if temperature <= 0:
        raise LmlabError(f"--temperature must be above 0 (greedy accuracy is always reported), not {temperature}",
                         field="--temperature")
    if len(checkpoints) > 2:
        raise LmlabError(f"lmlab eval takes one checkpoint, or two to compare; got {len(checkpoints)}",
                         field="CHECKPOINTS")
    loaded = [load_task(spec.strip(), n) for spec in tasks.split(",") if spec.strip()]  # bad tasks fail first
    for path in checkpoints:  # and bad checkpoints, before any launch
        check_checkpoint(path, "checkpoint")
    relaunch(nproc, nnodes, node_rank, master_addr, master_port, accelerate_config)
    results = {str(p): evaluate_checkpoint(p, loaded, samples, orm, temperature=temperature) for p in checkpoints}
    changes = stage_changes(results)
    payload: dict = {name: {k: v.as_dict(items=False) if isinstance(v, Estimate) else v for k, v in row.items()}
                     for name, row in results.items()}
    if changes:
        payload = {"a": payload[str(checkpoints[0])], "b": payload[str(checkpoints[1])],
                   "change": {k: d.as_dict() for k, d in changes[str(checkpoints[1])].items()}}
    else:
        payload = payload[str(checkpoints[0])]
    if world_size() > 1:  # how the items were split: each rank's count, in rank order
        payload["items_per_rank"] = items_per_rank()
    if not is_main():
        return
    if as_json:
        typer.echo(json.dumps(payload, indent=2))
    else:
        shared_console().print(comparison_table(results, changes, list(results[str(checkpoints[0])])))
    if out:
        from lmlab.paths import write_json_atomic

        write_json_atomic(out, payload)


@app.command("export-tasks")
@user_errors
def export_tasks(tasks: str = typer.Argument(..., help="Comma-separated embedded task names or task YAML files."),
                 out: Path = typer.Option(..., "--out", help="Directory for the lm-eval task YAMLs and items."),
                 checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="The checkpoint lm-eval will "
                                                           "score (generative tasks: its chat template renders the "
                                                           "prompts, its stop tokens end them)."),
                 n: int = typer.Option(500, "--n", min=1, help="Items per embedded task.")) -> None:
    """Write lmlab tasks as lm-evaluation-harness tasks that score exactly as `lmlab eval` does."""
    from lmlab.evaluate.lm_eval_export import export_lm_eval_tasks
    from lmlab.evaluate.tasks import load_task

    loaded = [load_task(spec.strip(), n) for spec in tasks.split(",") if spec.strip()]
    written = export_lm_eval_tasks(loaded, out, checkpoint)
    names = ",".join(p.stem for p in written)
    typer.echo(f"wrote {len(written)} lm-eval task(s) to {out}; run them with:\n"
               f"  lm_eval --model hf --model_args pretrained={checkpoint or 'CHECKPOINT'},dtype=float32 "
               f"--include_path {out} --tasks {names}")


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
    from lmlab.loading import load_recipe

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
    from lmlab.console import console as shared_console
    from rich.table import Table

    from lmlab.data.tokenizer import measure_tokenizers

    results, ratios, count = measure_tokenizers([tokenizer, *([against] if against else [])], source, docs)
    table = Table(title=f"tokenizer metrics on {count} documents of {source}")
    table.add_column("metric")
    for name in results:
        table.add_column(name, justify="right")
    for key in ("fertility", "continued_words", "bytes_per_token", "tokens", "words", "bytes"):
        table.add_row(key, *[f"{r[key]:.4f}" if isinstance(r[key], float) else f"{r[key]:,}" for r in results.values()])
    shared_console().print(table)
    if ratios is not None:
        typer.echo(f"ratios (first / second): {ratios}")


def main() -> None:  # pragma: no cover - entry point
    import sys

    from lmlab.distributed import shutdown

    if sys.argv[1:2] == ["--"]:  # a launcher's separator, passed on (lmlab.cli.launch)
        del sys.argv[1]
    try:
        app()
    except SystemExit as exit_:
        if exit_.code in (0, None):
            from lmlab.distributed import report

            report(state="done")
        raise
    finally:
        shutdown()
