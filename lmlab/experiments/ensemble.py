"""`lmlab ensemble RECIPE --members K`: K runs that differ by seed (init and data order), one ensemble.

Kotha et al. (2025): with fixed data, K independently trained members averaged at
the logits reach a lower loss than one model K times the size. The members train
as parallel processes through the ablation runner, on one shared tokenizer, and
are saved as one ensemble that loads like any checkpoint (`lmlab.models.ensemble`).
"""

from __future__ import annotations

from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.models.ensemble import Combine


def train_ensemble(recipe: str | Path, members: int, jobs: int | None = None, extra: list[str] | None = None,
                   combine: Combine = "logits") -> Path:
    """Train `members` copies of a stage recipe that differ by seed (init and data order), in parallel
    processes when there are cores (or GPUs) to spare, then save them as one ensemble."""
    from lmlab.data.tokenizer import resolve_tokenizer
    from lmlab.experiments.ablate import Variant, run_variants
    from lmlab.experiments.processes import default_jobs
    from lmlab.models.ensemble import save_ensemble
    from lmlab.loading import is_pipeline, load_recipe, read_yaml

    path = Path(recipe)
    if members < 2:
        raise LmlabError(f"an ensemble needs at least two members, got {members}", field="--members")
    tree, _ = read_yaml(path)
    if is_pipeline(tree):
        raise LmlabError("give a stage recipe (pretrain, cpt, sft, ...); ensemble the pipeline's stage instead",
                         file=str(path))
    base = tree.get("name", path.stem)
    out_dir = Path((tree.get("output") or {}).get("dir", "runs")) / f"{base}-ensemble"
    todo = [Variant(f"member-s{seed}", {"seed": seed}, seed, [f"seed={seed}", f"name=member-s{seed}"])
            for seed in range(members)]
    for variant in todo:  # every member validates before any trains
        first = load_recipe(path, [*(extra or []), *variant.overrides, f"output.dir={out_dir}"])
    if not first.tokenizer.path and not first.model.from_pretrained:
        # members must share one vocabulary: train the tokenizer once, not once per seed
        resolve_tokenizer(first.model_copy(update={"seed": 0}), out_dir)
        extra = [*(extra or []), f"tokenizer.path={out_dir / 'tokenizer'}"]
    failed = run_variants(path, [tree.get("stage", "pretrain")], todo, out_dir,
                          jobs or default_jobs(), extra)
    if failed:
        raise LmlabError(f"ensemble members failed: {', '.join(failed)}", file=str(out_dir / "logs"))
    return save_ensemble([out_dir / v.name / "final" for v in todo], out_dir / "ensemble", combine)
