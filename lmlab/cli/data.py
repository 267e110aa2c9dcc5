"""`lmlab data prepare | ls | rm | inspect`: the token stores in the cache, built ahead of a run or pruned.

Stages build a missing store themselves; `prepare` does it ahead of time (for a
pipeline, every stage whose tokenizer already exists), so a cluster job spends
its first minute training. `inspect` decodes a few rows with document boundaries
marked, to see what the model is fed.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from lmlab.errors import LmlabError


def _stage_recipes(path: Path, overrides: Optional[List[str]]) -> list:
    """The stage recipes of a pipeline file (tokenizer stages left out), or the one recipe of a stage file."""
    from lmlab.loading import is_pipeline, load_recipe, read_yaml

    if is_pipeline(read_yaml(path)[0]):
        from lmlab.pipeline import load_pipeline

        return [p.recipe for p in load_pipeline(path, overrides)[1] if p.makes_model]
    return [load_recipe(path, overrides)]


def _existing_tokenizer(recipe) -> Path | None:
    """The directory the stage will load its tokenizer from, if it exists yet."""
    candidates = [recipe.tokenizer.path, recipe.model.from_pretrained,
                  recipe.distill.teacher if recipe.stage == "distill" else None, recipe.run_dir / "tokenizer"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "tokenizer.json").is_file():
            return Path(candidate)
        if candidate and candidate != recipe.run_dir / "tokenizer":
            return None  # the named tokenizer is written by an earlier stage that has not run
    return None


def prepare(recipe: Path = typer.Argument(..., help="A stage recipe or a pipeline recipe."),
            set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Override a recipe key."),
            num_proc: Optional[int] = typer.Option(None, "--num-proc", help="Processes (default: data.num_proc, "
                                                   "else every core).")) -> None:
    """Build every token store a recipe or pipeline needs (already built ones are found, not rebuilt)."""
    from lmlab.console import console
    from lmlab.data.pretrain_data import prepare_recipe_data, uses_token_store
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.stages.preflight import check_data

    out = console()
    for stage in _stage_recipes(recipe, set_):
        if not uses_token_store(stage):
            continue
        tokenizer_dir = _existing_tokenizer(stage)
        if tokenizer_dir is None:
            out.print(f"{stage.name}: skipped, its tokenizer does not exist yet (run the stage that makes it)")
            continue
        if num_proc is not None:
            stage = stage.model_copy(update={"data": stage.data.model_copy(update={"num_proc": num_proc})})
        check_data(stage)
        for store in prepare_recipe_data(stage, load_tokenizer(tokenizer_dir)):
            out.print(f"{stage.name}: {summary(store.meta)} -> {store.path}")


def summary(meta: dict) -> str:
    tokens = meta["train"]["tokens"] + meta["validation"]["tokens"]
    docs = meta["train"]["documents"] + meta["validation"]["documents"]
    size = tokens * (2 if meta["dtype"] == "uint16" else 4) + docs * 8
    return (f"{docs:,} documents, {tokens:,} tokens ({meta['validation']['tokens']:,} held out), "
            f"{meta['chars'] / max(tokens, 1):.2f} chars/token, {size / 1e6:.1f} MB, built in {meta['seconds']:.1f} s")


def ls() -> None:
    """The token stores in the cache ($LMLAB_CACHE), one line each: key, source, documents, tokens, size."""
    from lmlab.data.store import list_stores, store_root

    stores = list_stores()
    typer.echo(f"{len(stores)} token stores in {store_root()}")
    for s in stores:
        meta = s["meta"]
        typer.echo(f"{s['key']}  {meta['source'].get('path') or meta['source']['kind']}  "
                   f"{meta['train']['documents'] + meta['validation']['documents']:,} documents  "
                   f"{meta['train']['tokens'] + meta['validation']['tokens']:,} tokens  "
                   f"{s['bytes'] / 1e6:.1f} MB  {meta['created']}")


def rm(keys: Optional[List[str]] = typer.Argument(None, help="Store keys (from `lmlab data ls`)."),
       all_: bool = typer.Option(False, "--all", help="Remove every store."),
       older_than: Optional[float] = typer.Option(None, "--older-than", help="Remove stores unused for this many days.")
       ) -> None:
    """Remove token stores from the cache (a run that needs one builds it again)."""
    import time

    from lmlab.data.store import list_stores, store_root
    from lmlab.paths import remove_tree

    stores = {s["key"]: s for s in list_stores()}
    if all_:
        chosen = list(stores)
    elif older_than is not None:
        cutoff = time.time() - older_than * 86400
        chosen = [k for k, s in stores.items() if (s["path"] / "meta.json").stat().st_atime < cutoff]
    else:
        chosen = list(keys or [])
        missing = [k for k in chosen if k not in stores]
        if missing or not chosen:
            raise LmlabError(f"no store named {', '.join(missing)}" if missing else "name stores, or --all",
                             field="keys", hint="see `lmlab data ls`")
    for key in chosen:
        remove_tree(store_root() / key, store_root())
    typer.echo(f"removed {len(chosen)} store(s)")


def inspect(store: str = typer.Argument(..., help="A store key or directory."),
            rows: int = typer.Option(3, "--rows", help="Rows to show."),
            seq_len: int = typer.Option(256, "--seq-len", help="Row length."),
            part: str = typer.Option("train", "--part", help="train or validation."),
            tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Decode with this tokenizer directory "
                                                     "(checked against the one the store was built with).")) -> None:
    """Decode a few rows of a store, marking where each document starts (|) and which tokens are not targets."""
    from lmlab.console import console
    from lmlab.data.rows import PackedRows
    from lmlab.data.store import open_store, store_root

    path = Path(store) if Path(store).is_dir() else store_root() / store
    opened = open_store(path)
    if part not in opened.parts:
        raise LmlabError("no such part (train or validation)", field="--part")
    decoder = _store_tokenizer(opened, tokenizer)
    data = PackedRows([opened.parts[part]], seq_len)
    out = console()
    out.print(summary(opened.meta))
    shown = min(rows, len(data))
    if not shown:
        out.print(f"the {part} part has no complete row of {seq_len} tokens")
        return
    cols = data.columns(range(shown))
    for i in range(shown):
        out.print(f"[bold]row {i}[/] ({seq_len} tokens):", markup=True)
        pieces = []
        for token, position, label in zip(cols["input_ids"][i], cols["position_ids"][i], cols["labels"][i]):
            text = decoder.decode([int(token)])
            pieces.append(("\n[document start] " if label == -100 and position == 0 else "") + text)
        out.print("".join(pieces), markup=False, highlight=False)


def _store_tokenizer(opened, directory: Optional[Path]):
    """The tokenizer to decode with: `--tokenizer` (refused if the store was built with another), else the
    copy of its definition the store keeps."""
    from transformers import PreTrainedTokenizerFast

    from lmlab.data.store import tokenizer_hash
    from lmlab.data.tokenizer import load_tokenizer

    if directory is not None:
        tokenizer = load_tokenizer(directory)
        if tokenizer_hash(tokenizer) != opened.meta["identity"]["tokenizer"]:
            raise LmlabError("this token store was built with another tokenizer", file=str(opened.path / "meta.json"),
                             field="tokenizer", hint=f"{directory} is not the tokenizer it was built with")
        return tokenizer
    return PreTrainedTokenizerFast(tokenizer_file=str(opened.path / "tokenizer.json"))
