"""The one artifact format every stage writes: an HF checkpoint directory plus `lmlab.json`.

The directory loads in vanilla transformers, vLLM and lm-eval (safetensors
weights, config, generation config, tokenizer with its chat template); the
manifest says which stage made it, from what, with which resolved recipe and
what it measured. It is written to a temporary sibling and renamed, so a
reader never sees half an artifact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lmlab
from lmlab.errors import LmlabError
from lmlab.paths import fsync_tree, remove_tree

MANIFEST = "lmlab.json"


def non_finite_parameters(model, state_dict: dict | None = None) -> list[str]:
    """Names of weights holding NaN or inf: a diverged model, which must never become an artifact."""
    import torch

    tensors = state_dict.items() if state_dict is not None else model.state_dict().items()
    return [name for name, t in tensors if torch.is_tensor(t) and t.is_floating_point()
            and not bool(torch.isfinite(t).all())]


def stop_at_end_of_turn(model, tokenizer) -> None:
    """The generation config lists EOS and the template's end-of-turn token, so plain `generate`,
    `pipeline` and vLLM (which stop on the generation config's EOS) end where a chat turn ends."""
    from lmlab.evaluate.generation import stop_ids

    config = getattr(model, "generation_config", None)
    if config is None:
        return
    stops = stop_ids(model, tokenizer)
    if stops:
        config.eos_token_id = stops
    if config.pad_token_id is None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id


def absolute_adapter_base(directory: Path) -> None:
    """A LoRA adapter names its base as the path the run was given; written absolute, it loads from any
    working directory (peft, `lmlab export`, every lmlab command)."""
    config = directory / "adapter_config.json"
    if not config.is_file():
        return
    record = json.loads(config.read_text())
    base = record.get("base_model_name_or_path")
    if base and Path(base).is_dir():
        record["base_model_name_or_path"] = str(Path(base).resolve())
        config.write_text(json.dumps(record, indent=2))


def save_artifact(model, tokenizer, out_dir: str | Path, manifest: dict[str, Any],
                  state_dict: dict | None = None) -> Path:
    """Write model + tokenizer + manifest atomically; returns the artifact directory.

    `state_dict` is the full (gathered) weights when the model is sharded across ranks.
    A model with non-finite weights is refused: a diverged run is never saved as a result.
    """
    out_dir = Path(out_dir)
    bad = non_finite_parameters(model, state_dict)
    if bad:
        raise LmlabError(f"training diverged: {len(bad)} weight tensors hold NaN or inf (e.g. {bad[0]}), so no "
                         "artifact is written", file=str(out_dir),
                         hint="lower optim.lr, keep optim.grad_clip at 1.0, or resume from an earlier checkpoint")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    remove_tree(tmp, out_dir.parent)
    model.config.use_cache = True  # training turns the KV cache off; generation wants it on
    stop_at_end_of_turn(model, tokenizer)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    absolute_adapter_base(tmp)
    tokenizer.save_pretrained(tmp)
    record = {"lmlab_version": lmlab.__version__, **manifest}
    (tmp / MANIFEST).write_text(json.dumps(record, indent=2, default=str))
    fsync_tree(tmp)
    remove_tree(out_dir, out_dir.parent)
    os.replace(tmp, out_dir)
    return out_dir


def read_manifest(artifact_dir: str | Path) -> dict[str, Any]:
    path = Path(artifact_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def export_adapter(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge a LoRA adapter into its base model: a full HF checkpoint with the tokenizer and chat template."""
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.models.build import adapter_base, load_adapter

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise LmlabError("not a LoRA adapter: adapter_config.json is missing", file=str(adapter_dir))
    base = adapter_base(adapter_dir)
    model = load_adapter(adapter_dir)
    manifest = {**read_manifest(adapter_dir), "stage": "export", "adapter": False, "merged_from": str(adapter_dir),
                "base_model": str(base)}
    return save_artifact(model, load_tokenizer(adapter_dir), out_dir, manifest)
