"""A stage's run directory and its resume: refuse to mix two runs, write the resolved recipe, and find
(and check) the checkpoint `--resume` continues from, before anything is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmlab.console import console
from lmlab.distributed import barrier, main_first, world_size
from lmlab.errors import LmlabError
from lmlab.loading import dump_recipe
from lmlab.paths import remove_run_dir
from lmlab.recipe import Recipe


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool, root: Path) -> None:
    """Refuse to mix two runs in one directory unless the user says resume or overwrite."""
    from lmlab.trainers import last_checkpoint, remove_staging

    checkpoints = run_dir / "checkpoints"
    if overwrite:
        remove_run_dir(run_dir, root)
    elif not resume and (last_checkpoint(checkpoints) or (run_dir / "final").exists()):
        raise LmlabError("this run directory already holds a run", file=str(run_dir),
                         hint="pass --resume to continue it, --overwrite to start again, or change `name`")
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_staging(checkpoints)


LAUNCH = "launch.json"  # how the run was launched (world size), to compare global batches on resume
# what a finished run may differ in and still be the same run (a study reuses it): logging and saving only
FREE_ON_REUSE = ("name", "output.", "eval.", "train.log_every", "train.eval_every", "train.eval_batches",
                 "train.save_every", "train.keep_last", "train.num_workers", "train.peak_tflops", "train.guard.",
                 "train.collective_timeout")
# what a resumed run may change freely: the same (a run that timed out resumes with a longer collective wait),
# and how its global batch is made (the global batch itself is compared)
FREE_ON_RESUME = FREE_ON_REUSE + ("train.micro_batch_size", "train.grad_accum")


def saved_recipe(run_dir: Path) -> Recipe | None:
    """The recipe a run directory was made with (its recipe.yaml), or None."""
    import yaml

    saved_file = run_dir / "recipe.yaml"
    return Recipe.model_validate(yaml.safe_load(saved_file.read_text())) if saved_file.is_file() else None


def changed_keys(recipe: Recipe, saved: Recipe, free: tuple[str, ...]) -> list[str]:
    """The keys (dotted) in which `recipe` differs from `saved`, those that start with a `free` prefix aside."""
    before = _dotted_keys(saved.model_dump(mode="json"))
    return [key for key, value in _dotted_keys(recipe.model_dump(mode="json")).items()
            if not key.startswith(free) and before.get(key) != value]


def check_resumable(recipe: Recipe) -> None:
    """`--resume` continues the same run: a changed budget, data, model, LR or global batch is refused."""
    saved = saved_recipe(recipe.run_dir)
    if saved is None:
        return
    saved_file = recipe.run_dir / "recipe.yaml"
    changed = changed_keys(recipe, saved, FREE_ON_RESUME)
    launch = recipe.run_dir / LAUNCH
    saved_world = json.loads(launch.read_text()).get("world_size", 1) if launch.is_file() else 1
    batch = lambda r, world: r.train.micro_batch_size * r.train.grad_accum * world  # noqa: E731
    if batch(saved, saved_world) != batch(recipe, world_size()):
        changed.append("global batch (train.micro_batch_size x train.grad_accum x processes)")
    if changed:
        raise LmlabError(f"--resume would continue a different run: {', '.join(changed[:6])}"
                         + (f" and {len(changed) - 6} more" if len(changed) > 6 else "") + " changed",
                         file=str(saved_file), hint="undo the change, or pass --force to resume anyway")


def _dotted_keys(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_dotted_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def open_stage(recipe: Recipe, resume: bool, overwrite: bool, checkpoints: Path | None = None,
               checked=None) -> Path | None:
    """Rank 0 prepares the run directory and writes the resolved recipe; every rank gets the resume point.
    `checked` (stages.preflight.Checked) is what run_stage or a pipeline already checked."""
    from lmlab.paths import write_json_atomic, write_text_atomic
    from lmlab.stages.preflight import check_inputs

    checked = check_inputs(recipe, checked=checked)  # every input, before the run directory is touched
    start = check_resume(recipe, checkpoints, checked.force) if resume else None
    barrier()  # every rank has read the previous run's files before rank 0 rewrites them
    with main_first() as main:
        if main:
            prepare_run_dir(recipe.run_dir, resume, overwrite, Path(recipe.output.dir))
            write_text_atomic(recipe.run_dir / "recipe.yaml", dump_recipe(recipe))
            write_json_atomic(recipe.run_dir / LAUNCH, {"world_size": world_size()})
    if not resume:
        return None
    console().print(f"resuming from {start}" if start else "no complete checkpoint yet: starting from step 0")
    return start


def check_resume(recipe: Recipe, checkpoints: Path | None = None, force: bool = False) -> Path | None:
    """The checkpoint `--resume` continues from, checked: the same run (unless --force), readable files."""
    from lmlab.trainers import last_checkpoint

    if not force:
        check_resumable(recipe)
    start = last_checkpoint(checkpoints or recipe.run_dir / "checkpoints")
    if start is not None:
        check_checkpoint_files(start)
    return start


def check_checkpoint_files(checkpoint: Path) -> None:
    """A checkpoint to resume from: its trainer state parses and its weights' headers read."""
    from lmlab.models.build import check_weights

    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LmlabError(f"the checkpoint's trainer_state.json is damaged ({exc})",
                         file=str(checkpoint / "trainer_state.json"), field="--resume",
                         hint="delete this checkpoint to resume from the one before it") from None
    if any(checkpoint.glob("*.safetensors")):
        try:
            check_weights(checkpoint, "--resume")
            check_training_state(checkpoint)
        except LmlabError as exc:
            raise LmlabError(exc.message, file=exc.file, field="--resume",
                             hint="delete this checkpoint to resume from the one before it") from None


def check_training_state(checkpoint: Path) -> None:
    """The optimizer, scheduler and RNG files a resume loads are whole archives (torch saves zip files; a
    truncated one loses its central directory), checked without unpickling anything."""
    import zipfile

    for file in sorted(checkpoint.glob("*.pt")) + sorted(checkpoint.glob("*.pth")):
        try:
            with zipfile.ZipFile(file) as archive:
                archive.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise LmlabError(f"damaged training state ({exc})", file=str(file)) from None
