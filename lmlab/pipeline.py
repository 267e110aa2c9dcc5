"""`lmlab run PIPELINE.yaml`: the whole lifecycle from one recipe, stage after stage.

    name: quickstart
    defaults: {train: {log_every: 10}}      # blocks every stage starts from
    stages:
      - {stage: tokenizer, tokenizer: {vocab_size: 4096}}
      - {stage: pretrain, model: {...}, data: {train: general}}
      - {stage: cpt, data: {train: math, replay: general}}
      - {stage: sft, data: {train: {kind: math, format: chat}}}
      - {stage: rl, from: sft}               # `from`: an earlier stage (default: the previous model)
      - {stage: eval, tasks: [math_id, math_ood], models: all}

Each stage is an ordinary stage recipe (the defaults deep-merged with its block),
run in `<output.dir>/<name>/<stage name>/`, and its input is the artifact of the
stage before it. Everything is validated before any compute. `pipeline.json` keeps
each stage's fingerprint (its resolved recipe and its input's fingerprint): running
the recipe again skips finished stages whose inputs are unchanged, resumes the one
that was interrupted, and reruns a stage (and all after it) whose recipe changed.
A lock keeps two processes out of one run directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from lmlab.data.cache import file_hash
from lmlab.distributed import barrier, is_main
from lmlab.errors import LmlabError
from lmlab.paths import NAME_PATTERN, remove_run_dir, run_lock, write_json_atomic
from lmlab.loading import is_pipeline, validate_recipe
from lmlab.recipe import STAGES, OutputConfig, Recipe, Strict, as_list, merge_blocks
from lmlab.stages import run_stage

MODEL_STAGES = tuple(STAGES)  # the stages that make a model
STATE = "pipeline.json"


class EvalStage(Strict):
    """The closing comparison: every chosen stage's model on the same tasks."""

    stage: Literal["eval"] = "eval"
    name: str = Field("eval", pattern=NAME_PATTERN)
    tasks: list[str] = Field(default_factory=lambda: ["math_id", "math_ood"])
    n: int = Field(100, gt=0)
    samples: int = Field(4, ge=1)  # maj@k / pass@k and the ORM score
    orm: str | None = "math_exact"
    temperature: float = Field(0.8, gt=0)  # of the samples; RL's own objective is the reward at its temperature
    general_bpb: bool = True  # bits per byte on held-out general text: forgetting, comparable across tokenizers
    math_bpb: bool = False  # bits per byte on held-out math problems with solutions: the domain's validation loss
    models: list[str] | Literal["all"] = "all"

    _list = model_validator(mode="before")(classmethod(lambda cls, v: {**v, "tasks": as_list(v["tasks"])}
                                                        if isinstance(v, dict) and "tasks" in v else v))


class Pipeline(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    seed: int = 0
    output: OutputConfig = Field(default_factory=OutputConfig)
    defaults: dict[str, Any] = Field(default_factory=dict)
    stages: list[dict[str, Any]] = Field(min_length=1)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / self.name


def _stage_node(root: yaml.Node | None, index: int) -> yaml.Node | None:
    if isinstance(root, yaml.MappingNode):
        stages = next((v for k, v in root.value if k.value == "stages"), None)
        if isinstance(stages, yaml.SequenceNode) and index < len(stages.value):
            return stages.value[index]
    return None


@dataclass
class PlannedStage:
    """One validated stage of a pipeline: what it is, its recipe, and the directory it will write."""

    kind: str  # "tokenizer", "eval", or the model stage it runs (pretrain, cpt, sft, ...)
    name: str
    recipe: Any  # a Recipe, or the EvalStage of an eval
    artifact: Path | None  # the tokenizer directory or final/ it writes; None for an eval

    @property
    def makes_model(self) -> bool:
        return self.kind not in ("tokenizer", "eval")


def _wire_input(kind: str, tree: dict, block: dict, artifacts: dict[str, str], last_model: str | None,
                error) -> None:
    """The model a stage starts from: `from: <stage>`, its own model.from_pretrained, or the latest model; a
    distillation's teacher the same way (its student starts fresh)."""
    source = block.get("from")
    if source is not None and source not in artifacts:
        raise error(f"'from: {source}' names no earlier stage that makes a model", "from")
    if kind == "distill":
        teacher = artifacts[source] if source else (tree.get("distill", {}).get("teacher") or last_model)
        if teacher is None:
            raise error("the distill stage needs a teacher, and no earlier stage makes one", "stage")
        tree.setdefault("distill", {})["teacher"] = teacher
    elif kind in MODEL_STAGES and kind != "pretrain":
        input_dir = artifacts[source] if source else (tree.get("model", {}).get("from_pretrained") or last_model)
        if input_dir is None:
            raise error(f"the {kind} stage continues a model, and no earlier stage makes one", "stage",
                        "put a pretrain stage first, or set model.from_pretrained")
        tree.setdefault("model", {})["from_pretrained"] = input_dir


def _eval_stage(block: dict, file: str, node, where: str, artifacts: dict[str, str], error) -> EvalStage:
    stage = validate_recipe(block, file, node, model=EvalStage, prefix=f"{where}.")
    unknown = [m for m in (stage.models if stage.models != "all" else []) if m not in artifacts]
    if unknown:
        raise error(f"eval names '{unknown[0]}', which no earlier stage makes", "models")
    if not artifacts:
        raise error("an eval stage needs an earlier stage that makes a model", None)
    return stage


def plan_stages(pipeline: Pipeline, file: str = "<pipeline>", root: yaml.Node | None = None,
                assume_exists: set[str] | None = None) -> list[PlannedStage]:
    """Each stage validated, inputs wired, order checked: all before compute.

    `assume_exists`: checkpoint paths to accept before they exist (`lmlab plan --emit` placeholders).
    """
    run_dir = pipeline.run_dir
    planned: list[PlannedStage] = []
    artifacts: dict[str, str] = {}  # stage name -> the final/ directory it will write
    tokenizer_dir: str | None = None
    for index, block in enumerate(pipeline.stages):
        where, kind = f"stages[{index}]", block.get("stage")
        name, node = block.get("name", kind), _stage_node(root, index)
        line = node.start_mark.line + 1 if node else None

        def error(message: str, field: str | None, hint: str | None = None) -> LmlabError:
            return LmlabError(message, file=file, line=line, field=f"{where}.{field}" if field else where, hint=hint)

        if any(p.name == name for p in planned):
            raise error(f"two stages are named '{name}'", "name", "give each stage a distinct `name`")
        if kind == "eval":
            planned.append(PlannedStage("eval", name, _eval_stage(block, file, node, where, artifacts, error), None))
            continue
        if kind != "tokenizer" and kind not in MODEL_STAGES:
            raise error(f"unknown stage '{kind}'", "stage", f"one of tokenizer, {', '.join(MODEL_STAGES)}, eval")
        tree = merge_blocks(pipeline.defaults, {k: v for k, v in block.items() if k not in ("from", "name")})
        tree.update(name=name, seed=tree.get("seed", pipeline.seed),
                    output={**pipeline.output.model_dump(), "dir": str(run_dir)})
        _wire_input(kind, tree, block, artifacts, next(reversed(artifacts.values()), None), error)
        if kind == "pretrain" and tokenizer_dir and not tree.get("tokenizer", {}).get("path"):
            tree["tokenizer"] = {**tree.get("tokenizer", {}), "path": tokenizer_dir}
        tree["stage"] = "pretrain" if kind == "tokenizer" else kind
        future = set(artifacts.values()) | ({tokenizer_dir} if tokenizer_dir else set()) | (assume_exists or set())
        recipe = validate_recipe(tree, file, node, future_artifacts=future, prefix=f"{where}.")
        artifact = run_dir / name / ("tokenizer" if kind == "tokenizer" else "final")
        if kind == "tokenizer":
            tokenizer_dir = str(artifact)
        else:
            artifacts[name] = str(artifact)
        planned.append(PlannedStage(kind, name, recipe, artifact))
    return planned


def load_pipeline(path: str | os.PathLike, overrides: list[str] | None = None) -> tuple[Pipeline, list[PlannedStage]]:
    from lmlab.loading import apply_override, read_yaml

    path = str(path)
    tree, root = read_yaml(path, "pipeline recipe")
    if not is_pipeline(tree):
        raise LmlabError("a pipeline recipe needs a `stages` list", file=path, field="stages")
    for assignment in overrides or []:
        apply_override(tree, assignment)
    tree.setdefault("name", Path(path).stem)
    pipeline = validate_recipe(tree, path, root, model=Pipeline)
    for index, block in enumerate(pipeline.stages):
        if not isinstance(block, dict) or "stage" not in block:
            raise LmlabError("each stage needs `stage:`", file=path, field=f"stages[{index}].stage")
    return pipeline, plan_stages(pipeline, path, root)


def stage_fingerprint(recipe: Recipe, run_dir: Path, upstream: str) -> str:
    """What decides whether a finished stage still stands: its resolved recipe (with paths inside the run
    directory written relative to it, so a moved run keeps its fingerprints), the content of every local
    data and task file it reads (an edited file reruns the stage), and the fingerprints of its inputs."""
    tree = recipe.model_dump(mode="json")
    tree.pop("output", None)
    tree.get("data", {}).pop("num_proc", None)  # the token store is the same for any number of processes
    text = json.dumps(tree, sort_keys=True, default=str)
    for root in {str(run_dir), str(run_dir.resolve())}:
        text = text.replace(root, "<run>")
    digest = hashlib.sha256((text + upstream).encode())
    for file in input_files(recipe):
        digest.update(file_hash(file).encode())  # remembered by stat: unchanged files are not read again
    return digest.hexdigest()[:16]


def input_files(recipe: Recipe) -> list[Path]:
    """The local files a stage reads: data sources, tokenizer sources, task files and their items."""
    import yaml as yaml_lib

    from lmlab.data.sources import local_files
    from lmlab.recipe import LOCAL_KINDS

    d = recipe.data
    specs = [*d.train, *(d.validation or []), *(d.replay or []), *(recipe.tokenizer.train_sources or [])]
    files = [f for s in specs if s.kind in LOCAL_KINDS for f in (local_files(s.path, s.kind) if s.kind != "disk"
                                                                  else sorted(Path(s.path).rglob("*")))]
    for task in recipe.eval.tasks:
        path = Path(task)
        if path.suffix in (".yaml", ".yml") and path.is_file():
            items = path.parent / (yaml_lib.safe_load(path.read_text()) or {}).get("path", "")
            files += [path] + ([items] if items.is_file() else [])
    return [f for f in files if f.is_file()]


def _save_state(run_dir: Path, state: dict[str, Any]) -> None:
    if is_main():
        write_json_atomic(run_dir / STATE, state)


def _run_tokenizer(recipe: Recipe, stage_dir: Path) -> None:
    """Train the tokenizer the way a pretrain stage would, into `<stage_dir>/tokenizer`."""
    from lmlab.paths import write_text_atomic
    from lmlab.loading import dump_recipe
    from lmlab.data.tokenizer import resolve_tokenizer

    if is_main():  # the marker that makes this an lmlab run directory
        write_text_atomic(stage_dir / "recipe.yaml", dump_recipe(recipe))
    resolve_tokenizer(recipe, stage_dir)


def check_all_inputs(planned: list[PlannedStage]) -> dict[str, Any]:
    """Preflight of every stage; artifacts that earlier stages will write are checked when they exist.
    Returns what was checked per stage (stages.preflight.Checked), handed to each stage when it runs."""
    from lmlab.evaluate.tasks import load_task
    from lmlab.stages.preflight import check_inputs

    future = {str(p.artifact) for p in planned if p.artifact is not None}
    checked = {}
    for stage in planned:
        if stage.kind == "eval":
            for spec in stage.recipe.tasks:
                load_task(spec, stage.recipe.n)
        else:
            checked[stage.name] = check_inputs(stage.recipe, future)
    return checked


def run_pipeline(path: str | os.PathLike, overrides: list[str] | None = None) -> Path:
    """Run (or continue) every stage in order; returns the run directory."""
    from lmlab.console import console as shared_console

    console = shared_console()
    pipeline, planned = load_pipeline(path, overrides)
    checked = check_all_inputs(planned)  # every stage's data, tasks and checkpoints, before any stage computes
    run_dir = pipeline.run_dir
    with run_lock(run_dir):
        state_file = run_dir / STATE
        state: dict[str, Any] = json.loads(state_file.read_text()) if state_file.is_file() else {}
        upstream: dict[str, str] = {}  # artifact path -> fingerprint of the stage that writes it
        for stage in planned:
            if stage.kind == "eval":
                _run_eval(stage.recipe, planned, run_dir)
                continue
            recipe, kind, artifact = stage.recipe, stage.kind, stage.artifact
            inputs = [recipe.model.from_pretrained, recipe.tokenizer.path, recipe.distill.teacher,
                      recipe.preference.policy]
            fp = stage_fingerprint(recipe, run_dir, "".join(upstream.get(i or "", "") for i in inputs))
            stage_dir = run_dir / recipe.name
            record = state.get(recipe.name, {})
            upstream[str(artifact)] = fp
            if record.get("fingerprint") == fp and record.get("done") and artifact.exists():
                console.print(f"[dim]{recipe.name}: done, inputs unchanged - skipped[/]")
                continue
            resume = record.get("fingerprint") == fp and stage_dir.exists()
            console.rule(f"[bold]{recipe.name}[/] ({kind})" + (" - resuming" if resume else ""))
            state[recipe.name] = {"fingerprint": fp, "done": False, "kind": kind, "started": time.time()}
            _save_state(run_dir, state)
            start = time.perf_counter()
            _run_one(stage, resume, run_dir, checked.get(stage.name))
            state[recipe.name].update(done=True, seconds=round(time.perf_counter() - start, 1),
                                      artifact=str(artifact))
            _save_state(run_dir, state)
        from lmlab.report import write_report

        report = write_report(run_dir) if is_main() else None
        barrier()
        console.print(f"[bold green]pipeline done:[/] {run_dir}  (report: {report})")
    return run_dir


def _run_one(stage: PlannedStage, resume: bool, run_dir: Path, checked) -> None:
    if stage.kind == "tokenizer":
        from lmlab.distributed import report

        report(stage=stage.name, step=None)  # run_stage says it for the others
        if is_main():
            remove_run_dir(run_dir / stage.name, run_dir)
        barrier()
        _run_tokenizer(stage.recipe, run_dir / stage.name)
    else:
        run_stage(stage.recipe, resume=resume, overwrite=not resume, checked=checked)


def _run_eval(stage: EvalStage, planned: list[PlannedStage], run_dir: Path) -> None:
    """The closing comparison of the chosen stages' models: every rank scores its share of the items, rank 0
    writes the results."""
    from lmlab.distributed import report
    from lmlab.evaluate.compare import run_comparison

    report(stage=stage.name, step=None)
    models = [(p.name, str(p.artifact)) for p in planned if p.makes_model and (stage.models == "all"
                                                                              or p.name in stage.models)]
    run_comparison(stage, models, run_dir / stage.name)
    barrier()


def describe(planned: list[PlannedStage]) -> list[str]:
    """One line per stage, for `lmlab run --dry-run`."""
    lines = []
    for stage in planned:
        if stage.kind == "eval":
            lines.append(f"{stage.name}: eval {', '.join(stage.recipe.tasks)} on {stage.recipe.models}")
            continue
        source = stage.recipe.model.from_pretrained if stage.kind not in ("tokenizer", "pretrain") else None
        lines.append(f"{stage.name}: {stage.kind}" + (f" <- {source}" if source else ""))
    return lines
