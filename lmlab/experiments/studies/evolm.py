"""EvoLM's findings at laptop scale, over several seeds, with every number behind each verdict.

EvoLM trains the whole lifecycle (pretraining, continued pretraining, SFT, RL) in
the open and measures what each stage buys. This study repeats its findings with
models of 20k-1M parameters on the embedded data, each designed so that it could
come out either way:

1. pretraining tokens per parameter: downstream gains flatten past roughly 80-160x
   (one constant-LR run per seed, its checkpoints scored at each budget);
2. CPT replay at the ratios the literature disputes (0-32% of the CPT mix), reported
   against both denominators: the share of the CPT mix and of the pretraining tokens;
3. SFT epochs on a chain whose in-domain accuracy saturates inside the sweep: ID
   rises then saturates while out-of-domain accuracy, per OOD family, peaks early;
4. RL after SFT lifts out-of-domain accuracy, over an RL budget sweep (checkpoints of
   one constant-LR run per variant: LRs, GRPO and RLOO);
5. across post-training checkpoints, a learned outcome reward model's score (trained
   on the SFT model's verifier-ranked samples, its pairwise accuracy reported) tracks
   maj@k, and validation loss does not; the verifier's own score is shown beside it;
6. long RL raises maj@k while pass@k falls.

A shared base model is pretrained once; everything after it is repeated per seed.
Finished runs and evaluations are reused, so an interrupted study resumes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from lmlab.console import console
from lmlab.experiments.studies.common import StudyRunner, finding_line, judged, load_study, margin, mean_std_text
from lmlab.paths import NAME_PATTERN, write_json_atomic, write_text_atomic
from lmlab.recipe import OutputConfig, Strict, merge_blocks
from lmlab.stats import mean_std

OOD_TASKS = ("math_ood_phrasing", "math_ood_two_step", "math_ood_operands")
NAME_RE = re.compile(NAME_PATTERN)


class PretrainScaling(Strict):
    model: dict[str, Any]
    tokens_per_param: list[float] = Field(default_factory=lambda: [5, 10, 20, 40, 80, 160, 320], min_length=3)
    optim: dict[str, Any] = Field(default_factory=dict)  # a constant LR, so every checkpoint is comparable
    data: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    cloze_items: int = Field(200, gt=0)


class RLSweep(Strict):
    """RL budgets as checkpoints of one constant-LR run per variant and seed, as the tokens-per-parameter sweep
    does for pretraining: `steps` are the checkpoints scored (each a multiple of the first); `variants` are
    blocks merged over the study's `rl` block (an LR, another algorithm); `primary` names, before any run,
    the variant findings 4 and 6 are judged on."""

    steps: list[int] = Field(min_length=2)
    variants: dict[str, dict[str, Any]] = Field(min_length=1)
    primary: str

    @model_validator(mode="after")
    def _checkpoints(self) -> "RLSweep":
        if self.steps != sorted(set(self.steps)) or self.steps[0] < 1 or any(s % self.steps[0] for s in self.steps):
            raise ValueError(f"steps {self.steps} must rise, each a whole multiple of the first (a checkpoint "
                             "lands on each)")
        if self.primary not in self.variants:
            raise ValueError(f"primary '{self.primary}' is not one of the variants ({', '.join(self.variants)})")
        for name in self.variants:
            if not NAME_RE.fullmatch(name):
                raise ValueError(f"variant name '{name}' must match {NAME_PATTERN}")
        return self


class LearnedOrm(Strict):
    """Finding 5's outcome reward model: an `rm` stage block (prompts, samples per prompt, temperature, epochs)
    trained on the samples of the policy RL starts from (the first seed's SFT model at rl_from_epochs), ranked
    by the verifier, from the chain's strongest model (its longest SFT): EvoLM's ORM is far larger than the
    policies it scores, and a reward model that starts from the policy it judges knows no more than it
    (run E3: pairwise accuracy at chance)."""

    rm: dict[str, Any]


class EvolmStudy(Strict):
    study: Literal["evolm"]
    name: str = Field(pattern=NAME_PATTERN)
    output: OutputConfig = Field(default_factory=OutputConfig)
    seeds: int = Field(2, ge=1)
    tokenizer: dict[str, Any] = Field(default_factory=dict)  # trained once, shared by every run
    defaults: dict[str, Any] = Field(default_factory=dict)  # blocks every run starts from
    pretrain_scaling: PretrainScaling
    base: dict[str, Any]  # the shared pretraining run the lifecycle chain starts from
    cpt: dict[str, Any]
    replay_ratios: list[float] = Field(default_factory=lambda: [0.0, 0.03, 0.05, 0.16, 0.32], min_length=2)
    sft_from_replay: float = 0.16
    # the chain's own CPT (per seed, at sft_from_replay), merged over `cpt`: long enough for the facts to be
    # learned, so SFT can saturate in-domain; empty: the replay run at sft_from_replay is the chain's CPT
    chain_cpt: dict[str, Any] = Field(default_factory=dict)
    sft: dict[str, Any]
    sft_epochs: list[float] = Field(default_factory=lambda: [1, 2, 4, 8, 16], min_length=3)
    # each OOD family alone: they may peak at different epochs; `ood/...` pools their items
    ood_tasks: list[str] = Field(default_factory=lambda: list(OOD_TASKS), min_length=1)
    rl: dict[str, Any]
    rl_from_epochs: float = 2
    rl_sweep: RLSweep
    orm: LearnedOrm | None = None  # none: the ORM is the exact-match verifier (its r^2 is then high by construction)
    eval_n: int = Field(200, gt=0)
    samples: int = Field(4, ge=2)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / self.name


SCHEMA = EvolmStudy  # what `lmlab.experiments.studies.load_study_file` validates a study file against


class Evaluator:
    """One cached row of numbers per model directory (general and math bits per byte, ID and each OOD family's
    tasks, `ood/...` pooled over the families' items, the ORM score), from the pipeline's closing comparison.
    `orm` is the verifier until the study's learned reward model exists. A row is stamped with the time its
    model was written, so a run trained again under the same name is evaluated again."""

    def __init__(self, study: EvolmStudy, cache: Path):
        self.study, self.cache_file, self.orm = study, cache, "math_exact"
        self.cache: dict[str, dict[str, float]] = json.loads(cache.read_text()) if cache.is_file() else {}

    def __call__(self, name: str, path: Path, generative: bool = True, cloze: int = 0) -> dict[str, float]:
        stamp = model_stamp(path)
        if self.cache.get(name, {}).get(STAMP) == stamp:
            return {k: v for k, v in self.cache[name].items() if k != STAMP}
        from lmlab.evaluate.evaluator import evaluate_checkpoint
        from lmlab.evaluate.tasks import load_task

        tasks = [load_task("general_cloze", cloze)] if cloze else []
        if generative:
            tasks += [load_task(task, self.study.eval_n) for task in ("math_id", *self.study.ood_tasks)]
        row = evaluate_checkpoint(path, tasks, self.study.samples, self.orm if generative else None,
                                  general_bpb=True, math_bpb=True)
        row = {**row, **pooled(row, self.study.ood_tasks)} if generative else row
        scores = {k: float(v) for k, v in row.items()}
        self.cache[name] = {STAMP: stamp, **scores}
        write_json_atomic(self.cache_file, self.cache)
        console().print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        return scores


STAMP = "_written"  # in an evaluation row: when the model it scores was written


def model_stamp(path: Path) -> float:
    """When a model directory's weights were written (its manifest, else its weights or config)."""
    for file in ("lmlab.json", "model.safetensors", "config.json"):
        if (path / file).is_file():
            return (path / file).stat().st_mtime
    return 0.0


def pooled(row: dict, tasks: list[str]) -> dict[str, float]:
    """`ood/<metric>`: every metric the OOD family tasks share, over all their items together."""
    metrics = set.intersection(*[{k.split("/", 1)[1] for k in row if k.startswith(f"{t}/")} for t in tasks])
    return {f"ood/{m}": sum(float(row[f"{t}/{m}"]) * row[f"{t}/{m}"].n for t in tasks)
            / sum(row[f"{t}/{m}"].n for t in tasks) for m in sorted(metrics)}


def _steps(study: EvolmStudy, tokenizer, tokens_per_step: int) -> tuple[int, list[int]]:
    """Steps per budget: every budget a whole multiple of the smallest, so one checkpoint lands on each."""
    from lmlab.models.build import build_model, count_parameters
    from lmlab.recipe import ModelConfig

    n_params = count_parameters(build_model(ModelConfig(**study.pretrain_scaling.model), tokenizer))
    budgets = sorted(study.pretrain_scaling.tokens_per_param)
    unit = max(1, round(budgets[0] * n_params / tokens_per_step))
    return n_params, [round(unit * b / budgets[0]) for b in budgets]


@dataclass
class EvolmRuns:
    """Every run of the study as a validated recipe tree, before any compute (later models are future
    artifacts), and the helpers that run and evaluate them."""

    study: EvolmStudy
    runner: StudyRunner
    evaluate: Evaluator
    scale: list[dict]
    base: dict
    cpt: dict
    chain: dict  # seed -> the CPT run the SFT sweep starts from
    sft: dict
    rl: dict  # (seed, variant) -> the run whose checkpoints are the budgets of rl_sweep.steps
    orm: dict | None

    def final(self, name: str) -> Path:
        return self.runner.final(name)


def plan_runs(study: EvolmStudy, path: str | Path) -> EvolmRuns:
    tok_dir = study.run_dir / "tokenizer"
    runner = StudyRunner(study.run_dir, str(path), {str(tok_dir)})
    seeds = list(range(study.seeds))

    def tree(name: str, stage: str, block: dict, seed: int = 0, **extra) -> dict:
        t = merge_blocks(merge_blocks(study.defaults, block), {"name": name, "stage": stage, "seed": seed,
                                                               "output": {"report_to": []}})
        if stage == "pretrain":
            t = merge_blocks(t, {"tokenizer": {"path": str(tok_dir)}})
        return merge_blocks(t, extra)

    final = lambda name: str(runner.final(name))  # noqa: E731
    scale, sweep = study.pretrain_scaling, study.rl_sweep
    sft_for_rl = lambda s: final(f"sft-ep{study.rl_from_epochs:g}-s{s}")  # noqa: E731
    checkpoints = {"max_steps": sweep.steps[-1], "save_every": sweep.steps[0],
                   "keep_last": sweep.steps[-1] // sweep.steps[0]}
    runs = EvolmRuns(
        study, runner, Evaluator(study, study.run_dir / "evaluations.json"),
        scale=[tree(f"pt-scaling-s{s}", "pretrain", {"model": scale.model, "optim": scale.optim, "data": scale.data,
                                                      "train": scale.train}, s) for s in seeds],
        base=tree("base", "pretrain", study.base),
        cpt={(s, r): tree(f"cpt-r{r:g}-s{s}", "cpt", study.cpt, s, model={"from_pretrained": final("base")},
                          data={"replay_ratio": r}) for s in seeds for r in study.replay_ratios},
        chain={s: tree(f"cpt-chain-s{s}", "cpt", merge_blocks(study.cpt, study.chain_cpt), s,
                       model={"from_pretrained": final("base")}, data={"replay_ratio": study.sft_from_replay})
               for s in seeds} if study.chain_cpt else {},
        sft={(s, e): tree(f"sft-ep{e:g}-s{s}", "sft", study.sft, s, train={"epochs": e},
                          model={"from_pretrained": final(f"cpt-chain-s{s}" if study.chain_cpt else
                                                          f"cpt-r{study.sft_from_replay:g}-s{s}")})
             for s in seeds for e in study.sft_epochs},
        rl={(s, v): tree(f"rl-{v}-s{s}", "rl", merge_blocks(study.rl, block), s, train=checkpoints,
                         model={"from_pretrained": sft_for_rl(s)})
            for s in seeds for v, block in sweep.variants.items()},
        orm=tree("orm", "rm", study.orm.rm, 0, preference={"policy": sft_for_rl(0)},
                 model={"from_pretrained": final(f"sft-ep{max(study.sft_epochs):g}-s0")}) if study.orm else None)
    every = [*runs.scale, runs.base, *runs.cpt.values(), *runs.chain.values(), *runs.sft.values(), *runs.rl.values(),
             *([runs.orm] if runs.orm else [])]
    runner.future |= {final(t["name"]) for t in every}
    for t in every:
        runner.validate(t)
    if study.sft_from_replay not in study.replay_ratios or study.rl_from_epochs not in study.sft_epochs:
        from lmlab.errors import LmlabError

        raise LmlabError("sft_from_replay must be one of replay_ratios and rl_from_epochs one of sft_epochs",
                         file=str(path))
    return runs


def pretrain_scaling(runs: EvolmRuns, tokenizer) -> dict[str, Any]:
    """1. tokens per parameter: one constant-LR run per seed, a checkpoint evaluated at every budget."""
    study, scale = runs.study, runs.study.pretrain_scaling
    probe = runs.runner.validate(runs.scale[0])
    n_params, steps = _steps(study, tokenizer, probe.train.micro_batch_size * probe.train.grad_accum
                             * probe.data.seq_len)
    scaling: dict[str, dict[str, list[float]]] = {}
    for t in runs.scale:
        t = merge_blocks(t, {"train": {"max_steps": steps[-1], "save_every": steps[0],
                                       "keep_last": steps[-1] // steps[0], "eval_every": steps[-1]}})
        runs.runner.run(t)
        for budget, step in zip(sorted(scale.tokens_per_param), steps):
            ckpt = study.run_dir / "runs" / t["name"] / "checkpoints" / f"checkpoint-{step}"
            row = runs.evaluate(f"{t['name']}@{budget:g}x", ckpt, generative=False, cloze=scale.cloze_items)
            for k, v in row.items():
                scaling.setdefault(f"{budget:g}", {}).setdefault(k, []).append(v)
    return {"parameters": n_params, "steps": steps, "by_budget": scaling}


def replay_runs(runs: EvolmRuns) -> dict[str, Any]:
    """2. CPT replay: forgetting of general text against domain gain, from one shared base; each ratio also as
    a share of the pretraining tokens, the denominator the literature's 5% figure uses."""
    base = runs.evaluate("base", runs.runner.run(runs.base), generative=False)
    replay: dict[str, dict[str, list[float]]] = {}
    for (_, r), t in runs.cpt.items():
        row = runs.evaluate(t["name"], runs.runner.run(t), generative=False)
        replay.setdefault(f"{r:g}", {}).setdefault("forgetting", []).append(row["general_bpb"] - base["general_bpb"])
        replay[f"{r:g}"].setdefault("domain_gain", []).append(base["math_bpb"] - row["math_bpb"])
    cpt_tokens = runs.runner.validate(next(iter(runs.cpt.values()))).train.tokens
    base_tokens = runs.runner.validate(runs.base).train.tokens
    return {"base": base, "by_ratio": replay, "cpt_tokens": cpt_tokens, "base_tokens": base_tokens}


def sft_runs(runs: EvolmRuns) -> dict[str, Any]:
    """3. the chain's CPT and the SFT epoch sweep, trained (evaluated once the learned ORM exists); the chain's
    CPT models scored on general and math text."""
    chain = {}
    for s, t in runs.chain.items():
        chain[str(s)] = runs.evaluate(t["name"], runs.runner.run(t), generative=False)
    for t in runs.sft.values():
        runs.runner.run(t)
    return chain


def learned_orm(runs: EvolmRuns) -> dict[str, Any] | None:
    """5. the outcome reward model, trained on the SFT model's verifier-ranked samples; from here on the
    evaluations score samples with it (the verifier's own score stays as mean@k)."""
    if runs.orm is None:
        return None
    from lmlab.artifacts import read_manifest

    final = runs.runner.run(runs.orm)
    runs.evaluate.orm = str(final)
    manifest = read_manifest(final)
    return {"path": str(final), "pairs": manifest.get("pairs"), "pairwise_accuracy": manifest.get("pairwise_accuracy")}


def post_training_runs(runs: EvolmRuns) -> dict[str, Any]:
    """3. SFT epochs and 4./6. the RL budget sweep, evaluated; their models are 5.'s checkpoints."""
    study, sweep = runs.study, runs.study.rl_sweep
    sft: dict[str, dict[str, list[float]]] = {}
    points = []
    for (_, e), t in runs.sft.items():
        row = runs.evaluate(t["name"], runs.runner.run(t))
        points.append({"model": t["name"], **row})
        for k, v in row.items():
            sft.setdefault(f"{e:g}", {}).setdefault(k, []).append(v)
    rl: dict[str, dict[str, dict[str, list[float]]]] = {}
    for (s, variant), t in runs.rl.items():
        runs.runner.run(t)
        start_name = f"sft-ep{study.rl_from_epochs:g}-s{s}"
        start = runs.evaluate(start_name, runs.final(start_name))
        for step in sweep.steps:
            ckpt = study.run_dir / "runs" / t["name"] / "checkpoints" / f"checkpoint-{step}"
            row = runs.evaluate(f"{t['name']}@{step}", ckpt)
            points.append({"model": f"{t['name']}@{step}", **row})
            for k in row:
                rl.setdefault(variant, {}).setdefault(str(step), {}).setdefault(k, []).append(row[k] - start[k])
    return {"sft_epochs": sft, "rl_sweep": rl, "checkpoints": points}


ORM_PREDICTORS = {"orm": "math_id/orm_score", "verifier": "math_id/mean@{k}", "math_bpb": "math_bpb"}


def orm_fits(points: list[dict], k: int) -> dict[str, float | None]:
    """Pearson r and r^2 against ID maj@k over checkpoints of: the ORM score (the learned reward model's, or
    the verifier's when the study has none), the verifier's own score of the same samples (mean@k), and the
    math validation loss (bits per byte)."""
    from lmlab.stats import pearson_r

    y = [p[f"math_id/maj@{k}"] for p in points]
    fit: dict[str, float | None] = {}
    for name, key in ORM_PREDICTORS.items():
        r = pearson_r([p[key.format(k=k)] for p in points], y)
        fit[name], fit[f"r_{name}"] = (None if r is None else r * r), r
    return fit


def orm_intervals(points: list[dict], k: int, rounds: int = 1000) -> dict[str, tuple[float, float]]:
    """95% bootstrap intervals (checkpoints resampled) of each r^2 in orm_fits and of finding 5's margin."""
    import random

    from lmlab.stats import quantile

    if len(points) < 3:
        return {name: (math.nan, math.nan) for name in (*ORM_PREDICTORS, "margin")}
    draw, samples = random.Random(0), {name: [] for name in (*ORM_PREDICTORS, "margin")}
    for _ in range(rounds):
        resampled = [draw.choice(points) for _ in points]
        fit = orm_fits(resampled, k)
        for name in ORM_PREDICTORS:
            samples[name].append(fit[name] if fit[name] is not None else 0.0)
        samples["margin"].append(_orm_signal(fit))
    return {name: (quantile(v, 0.025), quantile(v, 0.975)) for name, v in samples.items()}


def run_evolm(path: str | Path, overrides: list[str] | None = None) -> Path:
    """Run the study (reusing finished runs); writes evolm.json, evolm.md and plots; returns the md."""
    from lmlab.data.tokenizer import resolve_tokenizer
    from lmlab.loading import validate_recipe

    study = load_study(path, EvolmStudy, overrides)
    runs = plan_runs(study, path)
    tokenizer = resolve_tokenizer(validate_recipe(merge_blocks(study.defaults, {
        "name": "tokenizer", "tokenizer": study.tokenizer, "data": study.base.get("data", {})}), file=str(path)),
        study.run_dir)  # trained once into <study>/tokenizer
    results: dict[str, Any] = {"seeds": study.seeds, "pretrain_scaling": pretrain_scaling(runs, tokenizer),
                               "replay": replay_runs(runs)}
    results["chain_cpt"] = sft_runs(runs)
    results["orm"] = learned_orm(runs)
    results.update(post_training_runs(runs))
    results["r2"] = orm_fits(results["checkpoints"], study.samples)
    results["r2_intervals"] = orm_intervals(results["checkpoints"], study.samples)
    results["findings"] = findings(study, results)
    return write_report(study, results)


def findings(study: EvolmStudy, results: dict) -> list[dict]:
    """Each of EvoLM's six claims, with whether these runs reproduce it and the numbers that say so."""
    return [finding(study, results) for finding in (_scaling_finding, _replay_finding, _sft_finding, _rl_finding,
                                                    _orm_finding, _rl_sampling_finding)]


def _scaling_finding(study: EvolmStudy, results: dict) -> dict:
    """1. diminishing returns of pretraining tokens per parameter; per seed, the margin is a third of the
    gain per doubling before ~80x minus the gain per doubling at the largest budgets."""
    scaling = results["pretrain_scaling"]["by_budget"]
    budgets = sorted(scaling, key=float)
    lo, mid = budgets[0], min(budgets[1:], key=lambda b: abs(float(b) - 80))
    hi_a, hi_b = budgets[-2], budgets[-1]
    bpb = {b: scaling[b]["general_bpb"] for b in budgets}
    early = [(a - b) / math.log2(float(mid) / float(lo)) for a, b in zip(bpb[lo], bpb[mid])]
    late = [(a - b) / math.log2(float(hi_b) / float(hi_a)) for a, b in zip(bpb[hi_a], bpb[hi_b])]
    return judged(
        "pretraining gains flatten past roughly 80-160 tokens per parameter",
        f"margin = (general bits/byte gained per doubling from {lo}x to {mid}x) / 3 - (gained per doubling from "
        f"{hi_a}x to {hi_b}x), per seed",
        {"flattening": margin([e / 3 - lt for e, lt in zip(early, late)])},
        f"gain per doubling {mean_std_text(early, 4)} from {lo}x to {mid}x vs {mean_std_text(late, 4)} from "
        f"{hi_a}x to {hi_b}x ({results['pretrain_scaling']['parameters']:,} params); bpb: "
        + ", ".join(f"{b}x {mean_std_text(scaling[b]['general_bpb'])}" for b in budgets)
        + "; cloze accuracy: " + ", ".join(f"{b}x {mean_std_text(scaling[b]['general_cloze/accuracy'])}"
                                           for b in budgets))


def _replay_finding(study: EvolmStudy, results: dict) -> dict:
    """2. replay: less forgetting than none, and most of the domain gain kept at ~16%; each ratio also given as
    a share of the pretraining tokens, with the ratio the runs favour in both denominators."""
    rep = results["replay"]["by_ratio"]
    ratios = sorted(rep, key=float)
    none, r16 = ratios[0], min(ratios[1:], key=lambda r: abs(float(r) - 0.16))
    less = [a - b for a, b in zip(rep[none]["forgetting"], rep[r16]["forgetting"])]
    kept = [b - 0.8 * a for a, b in zip(rep[none]["domain_gain"], rep[r16]["domain_gain"])]
    share = _pretraining_share(results["replay"])
    return judged(
        "CPT replay trades forgetting for domain gain; ~16% keeps most of the gain",
        f"two margins per seed: forgetting (general bpb rise) at replay {none} minus at {r16}, and the domain gain "
        f"(math bpb fall) at {r16} minus 0.8 x the gain at {none}",
        {"less forgetting": margin(less), "gain kept": margin(kept)},
        "; ".join(f"replay {r} of the CPT mix ({share(r)} of the pretraining tokens): forgetting "
                  f"{mean_std_text(rep[r]['forgetting'])}, domain gain {mean_std_text(rep[r]['domain_gain'])}"
                  for r in ratios) + ". " + _favoured_ratio(rep, ratios, share))


def _pretraining_share(replay: dict):
    """A ratio of the CPT mix as a share of the base model's pretraining tokens (EvoLM's best run: 16% of a 50B
    mix is 5% of its 160B pretraining tokens)."""
    cpt, base = replay.get("cpt_tokens"), replay.get("base_tokens")
    return lambda r: f"{float(r) * cpt / base:.1%}" if cpt and base else "unknown"


def _favoured_ratio(rep: dict, ratios: list[str], share) -> str:
    """The rule, fixed before the run: the largest ratio whose mean domain gain is at least 0.8 x replay 0's
    (the least forgetting that keeps most of the gain); said in both denominators."""
    floor = 0.8 * mean_std(rep[ratios[0]]["domain_gain"])[0]
    keeping = [r for r in ratios[1:] if mean_std(rep[r]["domain_gain"])[0] >= floor]
    if not keeping:
        return "No replay ratio keeps 0.8 x the domain gain of no replay."
    best = max(keeping, key=float)
    return (f"Favoured (largest ratio keeping >= 0.8 x the no-replay domain gain): {best} of the CPT mix = "
            f"{share(best)} of the pretraining tokens; EvoLM's best is 16% of the mix = 5% of the pretraining tokens.")


def _epoch_slope(sft: dict, key: str, a: str, b: str) -> list[float]:
    """Per seed, the change of `key` per doubling of SFT epochs from a to b."""
    return [(y - x) / math.log2(float(b) / float(a)) for x, y in zip(sft[a][key], sft[b][key])]


def _sft_finding(study: EvolmStudy, results: dict) -> dict:
    """3. SFT epochs: ID rises and saturates inside the sweep; each OOD family is higher in EvoLM's 2-4 epoch
    window than at the longest SFT. The window is the paper's, fixed in advance, so no peak is picked here."""
    k, sft = study.samples, results["sft_epochs"]
    epochs = sorted(sft, key=float)
    first, last, before_last = epochs[0], epochs[-1], epochs[-2]
    early_end = min(epochs[1:-1] or epochs[1:], key=lambda e: abs(float(e) - 4))
    window = [e for e in epochs if 2 <= float(e) <= 4 and e != last]
    id_key = "math_id/greedy_accuracy"
    rises = [b - a for a, b in zip(sft[first][id_key], sft[last][id_key])]
    early, late = _epoch_slope(sft, id_key, first, early_end), _epoch_slope(sft, id_key, before_last, last)
    margins = {"ID rises": margin(rises), "ID saturates": margin([e / 3 - lt for e, lt in zip(early, late)])}
    for task in study.ood_tasks:
        name = f"{task.removeprefix('math_ood_')} OOD falls after 2-4 epochs"
        if not window or f"{task}/greedy_accuracy" not in sft[last]:
            margins[name] = {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan}
            continue
        ood = {e: sft[e][f"{task}/greedy_accuracy"] for e in epochs}
        in_window = [sum(ood[e][i] for e in window) / len(window) for i in range(len(ood[last]))]
        margins[name] = margin([w - z for w, z in zip(in_window, ood[last])])
    return judged(
        "more SFT epochs raise in-domain accuracy until it saturates, while out-of-domain peaks early, then falls",
        f"margins per seed: ID greedy accuracy at {last} epochs minus at {first}; ID saturates = a third of its gain "
        f"per doubling from {first} to {early_end} epochs minus its gain per doubling from {before_last} to {last}; "
        f"per OOD family, greedy accuracy averaged over the sweep's epochs in EvoLM's 2-4 window "
        f"({', '.join(window) or 'none'}) minus at {last}",
        margins,
        "; ".join(f"{e} ep: ID greedy {mean_std_text(sft[e][id_key])}, "
                  + ", ".join(f"{t.removeprefix('math_ood_')} {mean_std_text(sft[e].get(f'{t}/greedy_accuracy', []))}"
                              for t in study.ood_tasks)
                  + f", OOD maj@{k} {mean_std_text(sft[e].get(f'ood/maj@{k}', []))}" for e in epochs))


def _sweep_numbers(study: EvolmStudy, sweep: dict, keys: list[str]) -> str:
    return "; ".join(f"{variant} @{step} steps: " + ", ".join(f"{key} {_pct(deltas[key])}" for key in keys)
                     for variant, by_step in sweep.items() for step, deltas in by_step.items())


def _primary_at_largest_budget(study: EvolmStudy, results: dict):
    """(k, the sweep, every variant's changes, the primary variant's changes at its largest budget)."""
    sweep, rl = study.rl_sweep, results["rl_sweep"]
    return study.samples, sweep, rl, rl[sweep.primary][str(sweep.steps[-1])]


def _rl_finding(study: EvolmStudy, results: dict) -> dict:
    """4. RL lifts OOD: the margin is the primary variant's pooled OOD greedy accuracy at the largest budget minus
    its SFT model's, per seed; every variant and budget is reported beside it."""
    k, sweep, rl, top = _primary_at_largest_budget(study, results)
    return judged(
        f"RL after SFT ({study.rl_from_epochs:g} epochs) lifts out-of-domain accuracy",
        f"margin = pooled OOD greedy accuracy of the primary variant ({sweep.primary}, named before the run) at "
        f"its largest budget ({sweep.steps[-1]} steps) minus its SFT model's, per seed",
        {"OOD lift": margin(top["ood/greedy_accuracy"])},
        f"RL minus SFT in points (n={study.eval_n} per task): "
        + _sweep_numbers(study, rl, ["ood/greedy_accuracy", f"ood/maj@{k}", "math_id/greedy_accuracy"]))


def _rl_sampling_finding(study: EvolmStudy, results: dict) -> dict:
    """6. long RL sharpens: pooled OOD maj@k rises while pass@k falls, at the primary variant's largest budget."""
    k, sweep, rl, top = _primary_at_largest_budget(study, results)
    return judged(
        f"long RL raises maj@{k} while pass@{k} falls",
        f"two margins per seed, pooled OOD, the primary variant ({sweep.primary}) at {sweep.steps[-1]} steps minus "
        f"its SFT model: the change of maj@{k}, and minus the change of pass@{k}",
        {f"maj@{k} rises": margin(top[f"ood/maj@{k}"]),
         f"pass@{k} falls": margin([-v for v in top[f"ood/pass@{k}"]])},
        "RL minus SFT in points: " + _sweep_numbers(study, rl, [f"ood/maj@{k}", f"ood/pass@{k}",
                                                                 f"math_id/maj@{k}", f"math_id/pass@{k}"]))


def _orm_signal(fit: dict[str, float | None]) -> float:
    """From orm_fits: r^2 of the ORM score against maj@k where it points the right way (r > 0), minus the same
    for validation loss (a loss predicts accuracy only when lower loss goes with higher accuracy, r < 0)."""
    orm = fit["orm"] if (fit["r_orm"] or 0) > 0 else 0.0
    loss = fit["math_bpb"] if (fit["r_math_bpb"] or 0) < 0 else 0.0
    return orm - loss


def _orm_finding(study: EvolmStudy, results: dict) -> dict:
    """5. ORM score tracks maj@k; validation loss does not: bootstrapped over checkpoints (1,000 resamples)."""
    k, fit, points = study.samples, results["r2"], results["checkpoints"]
    ci = results.get("r2_intervals") or orm_intervals(points, k)
    learned = results.get("orm")
    if learned:
        acc = learned.get("pairwise_accuracy") or {}
        source = (f"the ORM is a reward model trained on {learned.get('pairs')} verifier-ranked pairs of the SFT "
                  f"model's samples; held-out pairwise accuracy {acc.get('value', math.nan):.3f} "
                  f"[{acc.get('ci_low', math.nan):.3f}, {acc.get('ci_high', math.nan):.3f}] over {acc.get('n')} pairs")
    else:
        source = "the ORM here is the exact-match verifier scoring the same samples, so its r^2 is high by construction"
    r_loss = fit["r_math_bpb"]
    return judged(
        f"across post-training checkpoints the ORM score tracks maj@{k} (r^2) and validation loss does not",
        f"margin = r^2(ORM score, ID maj@{k}) counted only when r > 0, minus r^2(math validation bpb, ID maj@{k}) "
        "counted only when r < 0; interval: 1,000 bootstrap resamples of the checkpoints",
        {"ORM over loss": margin([_orm_signal(fit)], tuple(ci["margin"]))},
        f"{len(points)} checkpoints (SFT epochs and RL budgets x seeds): r^2 with ID maj@{k} (95% bootstrap "
        f"interval): ORM score {_r2(fit['orm'])} {_ci(ci['orm'])} (r = {_r2(fit['r_orm'])}), the verifier's "
        f"mean@{k} {_r2(fit['verifier'])} {_ci(ci['verifier'])}, math validation bits/byte {_r2(fit['math_bpb'])} "
        f"{_ci(ci['math_bpb'])} (r = {_r2(r_loss)}: "
        + ("lower loss, higher accuracy" if (r_loss or 0) < 0 else "higher loss goes with HIGHER accuracy, so loss "
           "misleads")
        + f"); {source}")


def _ci(interval) -> str:
    low, high = interval
    return "[undefined]" if math.isnan(low) else f"[{low:.3f}, {high:.3f}]"


def _pct(values: list[float]) -> str:
    return mean_std_text([100 * v for v in values], 1)


def _r2(value: float | None) -> str:
    return "undefined (no spread)" if value is None else f"{value:.3f}"


def _plots(study: EvolmStudy, results: dict) -> list[Path]:
    """One figure per finding that has a curve: mean ± std over seeds."""
    from lmlab.plots import new_figure, save_figure

    out, k, pngs = study.run_dir, study.samples, []

    def errorbar(ax, xs, series, label):
        stats = [mean_std(v) for v in series]
        ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=label)

    scaling = results["pretrain_scaling"]["by_budget"]
    budgets = sorted(scaling, key=float)
    plt, fig, ax = new_figure()
    errorbar(ax, [float(b) for b in budgets], [scaling[b]["general_bpb"] for b in budgets], "general bits/byte")
    ax.set_xscale("log", base=2)
    ax.axvspan(80, 160, alpha=0.15, label="EvoLM's 80-160x")
    pngs.append(save_figure(plt, fig, ax, out / "f1_tokens_per_param.png", "pretraining tokens per parameter",
                            "bits per byte (held-out general text)", "1. pretraining budget (mean ± std over seeds)"))
    rep = results["replay"]["by_ratio"]
    ratios = sorted(rep, key=float)
    plt, fig, ax = new_figure()
    errorbar(ax, [float(r) for r in ratios], [rep[r]["forgetting"] for r in ratios], "forgetting: general bpb rise")
    errorbar(ax, [float(r) for r in ratios], [rep[r]["domain_gain"] for r in ratios], "domain gain: math bpb fall")
    pngs.append(save_figure(plt, fig, ax, out / "f2_replay.png", "replay ratio (share of the CPT mix)",
                            "bits per byte", "2. CPT replay (mean ± std over seeds)"))
    sft = results["sft_epochs"]
    epochs = sorted(sft, key=float)
    plt, fig, ax = new_figure()
    for key in ("math_id/greedy_accuracy", *(f"{t}/greedy_accuracy" for t in study.ood_tasks), f"ood/maj@{k}"):
        errorbar(ax, [float(e) for e in epochs], [sft[e][key] for e in epochs], key)
    ax.set_xscale("log", base=2)
    pngs.append(save_figure(plt, fig, ax, out / "f3_sft_epochs.png", "SFT epochs", "accuracy",
                            "3. SFT epochs (mean ± std over seeds)"))
    plt, fig, ax = new_figure()
    for variant, by_step in results["rl_sweep"].items():
        steps = sorted(by_step, key=int)
        for key in ("ood/greedy_accuracy", f"ood/pass@{k}"):
            errorbar(ax, [int(x) for x in steps], [by_step[x][key] for x in steps], f"{variant}: {key}")
    ax.set_xscale("log", base=2)
    pngs.append(save_figure(plt, fig, ax, out / "f4_rl_budget.png", "RL steps", "change from the SFT model",
                            "4./6. RL budget (mean ± std over seeds)"))
    points, fit = results["checkpoints"], results["r2"]
    y = [p[f"math_id/maj@{k}"] for p in points]
    for name, key in ORM_PREDICTORS.items():
        key = key.format(k=k)
        plt, fig, ax = new_figure((5, 3.6))
        ax.scatter([p[key] for p in points], y)
        pngs.append(save_figure(plt, fig, ax, out / f"f5_{name}_vs_maj.png", key, f"ID maj@{k}",
                                f"5. {key} vs maj@{k} (r² = {_r2(fit[name])})", legend=False))
    return pngs


def write_report(study: EvolmStudy, results: dict) -> Path:
    out, k = study.run_dir, study.samples
    write_json_atomic(out / "evolm.json", results)
    pngs = _plots(study, results)
    lines = [f"# {study.name}: EvoLM's findings at laptop scale ({study.seeds} seeds)", "",
             "Numbers are mean ± std over seeds. Accuracies are on held-out prompts (n = "
             f"{study.eval_n} per task; OOD per family: {', '.join(study.ood_tasks)}; `ood/` pools their items), "
             f"maj@{k}, pass@{k}, mean@{k} (the share of samples that are right) and the ORM score from the same {k} "
             "samples per prompt. Each finding's verdict comes from a margin and a rule written in the code before "
             "any run: reproduced, not reproduced, or inconclusive when its 95% interval does not separate from "
             "zero.", "", "## Findings", ""]
    lines += [finding_line(i, f) for i, f in enumerate(results["findings"], 1)]
    lines += ["", "## Post-training checkpoints", "",
              f"| model | ID greedy | ID maj@{k} | ID pass@{k} | ID mean@{k} | ID ORM | OOD greedy | OOD maj@{k} | "
              f"OOD pass@{k} | math bpb | general bpb |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in results["checkpoints"]:
        lines.append(f"| {p['model']} | " + " | ".join(f"{p[key]:.3f}" for key in (
            "math_id/greedy_accuracy", f"math_id/maj@{k}", f"math_id/pass@{k}", f"math_id/mean@{k}",
            "math_id/orm_score", "ood/greedy_accuracy", f"ood/maj@{k}", f"ood/pass@{k}", "math_bpb",
            "general_bpb")) + " |")
    lines += [""] + [f"![{p.stem}]({p.name})" for p in pngs]
    report = out / "evolm.md"
    write_text_atomic(report, "\n".join(lines) + "\n")
    return report
