"""Recipes, pipelines, studies and task files read from YAML, with errors that name file, line and key.

One reader for every YAML file lmlab takes (`read_yaml`: not found, not UTF-8, invalid YAML and not a
mapping are each one error line), `--set` overrides, validation against a schema that turns pydantic's
errors into the line of the offending key (with a did-you-mean for typos and for HF / TRL argument names),
and the resolved recipe written back as YAML.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from lmlab.errors import LmlabError
from lmlab.recipe import BUDGET_KEYS, Recipe


def read_yaml(path: str | os.PathLike, what: str = "recipe") -> tuple[dict, yaml.Node | None]:
    """(tree, node tree for line numbers) of a YAML mapping file; every failure one error naming the file."""
    path = str(path)
    if not Path(path).is_file():
        raise LmlabError(f"{what} file not found", file=path)
    text = read_yaml_text(path)
    try:
        root, tree = yaml.compose(text), yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise LmlabError(f"invalid YAML: {getattr(exc, 'problem', exc)}", file=path,
                         line=mark.line + 1 if mark else None) from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise LmlabError(f"a {what} must be a mapping of keys", file=path)
    return tree, root


def is_pipeline(tree: dict) -> bool:
    """A pipeline recipe lists `stages:`; a stage recipe does not."""
    return isinstance(tree, dict) and "stages" in tree


def _list_item(items: list, part: str, key: str) -> Any:
    """A list element by index, or (pipeline stages) by its `name`, else its `stage`."""
    if part.isdigit() and int(part) < len(items):
        return items[int(part)]
    for item in items:
        if isinstance(item, dict) and item.get("name", item.get("stage")) == part:
            return item
    raise LmlabError(f"no list item '{part}' to set '{key}'", field="--set")


def apply_override(tree: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML.

    In a list, a part selects an item by index or by name: `stages.sft.train.epochs=2`.
    """
    if "=" not in assignment:
        raise LmlabError(f"override '{assignment}' must look like key.path=value", field="--set")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node: Any = tree
    for part in parts[:-1]:
        child = _list_item(node, part, key) if isinstance(node, list) else node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, (dict, list)):
            raise LmlabError(f"'{part}' is not a block, cannot set '{key}'", field="--set")
        node = child
    if not isinstance(node, dict):
        raise LmlabError(f"cannot set '{key}': '{parts[-2]}' is a list", field="--set")
    if len(parts) > 1 and parts[-2] == "train" and parts[-1] in BUDGET_KEYS:
        for other in BUDGET_KEYS:  # a budget from the command line replaces the recipe's, whichever kind it is
            node.pop(other, None)
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError as exc:
        raise LmlabError(f"the value '{raw}' is not valid YAML ({getattr(exc, 'problem', exc)})",
                         field=f"--set {key.strip()}") from None


def _line_of(root: yaml.Node | None, loc: tuple) -> int | None:
    """1-based line of the deepest YAML node along a pydantic error location."""
    node, line = root, None
    for key in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == str(key)), None)
            if node is None:
                # the key is absent or unknown: report the key itself when it exists
                break
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
    else:
        if node is not None:
            line = node.start_mark.line + 1
    return line


def _key_line(root: yaml.Node | None, loc: tuple) -> int | None:
    """Like _line_of, but for an unknown key: the line where that key is written."""
    node = root
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(key)), None)
            if match is None:
                return None
            if key == loc[-1]:
                return match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            return None
    return None


def validate_recipe(tree: dict, file: str = "<recipe>", root: yaml.Node | None = None,
                    future_artifacts: set[str] | None = None, model: type[BaseModel] | None = None,
                    overridden: list[str] | None = None, prefix: str = "") -> Recipe:
    """Validate a recipe tree; the first problem becomes one LmlabError with file, line and key path.

    `future_artifacts` are checkpoint / tokenizer paths that earlier pipeline stages will write.
    """
    try:
        return (model or Recipe).model_validate(tree, context={"future_artifacts": future_artifacts or set()})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        field = prefix + (".".join(str(p) for p in loc) or "<top>")
        suggestion = None
        if err["type"] == "extra_forbidden":
            message = f"unknown key '{loc[-1]}'"
            line = _key_line(root, loc)
            suggestion = suggest_key(model or Recipe, loc)
        else:
            message = err["msg"].removeprefix("Value error, ")
            line = _line_of(root, loc)
        more = len(exc.errors()) - 1
        hint = "; ".join(filter(None, [suggestion, f"and {more} more problem{'s' if more > 1 else ''}" if more
                                       else None])) or None
        flag = next((key for key in overridden or [] if field == key or field.startswith(key + ".")), None)
        if flag is not None:  # the value came from the command line, not from the file
            raise LmlabError(message, field=f"--set {field}", hint=hint) from None
        raise LmlabError(message, file=file, line=line, field=field, hint=hint) from None


# the HF Trainer / TRL names users type, and where lmlab keeps the same setting
HF_NAMES = {"learning_rate": "optim.lr", "num_train_epochs": "train.epochs", "max_steps": "train.max_steps",
            "per_device_train_batch_size": "train.micro_batch_size", "gradient_accumulation_steps": "train.grad_accum",
            "max_length": "data.seq_len", "max_seq_length": "data.seq_len", "cutoff_len": "data.seq_len",
            "warmup_ratio": "optim.warmup_ratio", "weight_decay": "optim.weight_decay",
            "max_grad_norm": "optim.grad_clip", "lr_scheduler_type": "optim.schedule", "optim": "optim.optimizer",
            "lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
            "model_name_or_path": "model.from_pretrained", "output_dir": "output.dir", "seed": "seed",
            "logging_steps": "train.log_every", "save_steps": "train.save_every", "eval_steps": "train.eval_every",
            "bf16": "train.precision", "gradient_checkpointing": "train.gradient_checkpointing"}


def suggest_key(model: type[BaseModel], loc: tuple) -> str | None:
    """'did you mean ...' for an unknown key: a close spelling in its block, or the lmlab key an HF name maps to."""
    import difflib

    node: Any = model
    for part in loc[:-1]:
        field = node.model_fields.get(str(part)) if isinstance(node, type) and issubclass(node, BaseModel) else None
        node = field.annotation if field is not None else None
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            node = None
            break
    unknown = str(loc[-1])
    if unknown in HF_NAMES:
        return f"lmlab calls it {HF_NAMES[unknown]}"
    if node is not None:
        close = difflib.get_close_matches(unknown, list(node.model_fields), n=1, cutoff=0.6)
        if close:
            prefix = ".".join(str(p) for p in loc[:-1])
            return f"did you mean {prefix + '.' if prefix else ''}{close[0]}?"
    return None


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a YAML recipe."""
    path = str(path)
    tree, root = read_yaml(path)
    for assignment in overrides or []:
        apply_override(tree, assignment)
    tree.setdefault("name", Path(path).stem)
    return validate_recipe(tree, file=path, root=root, overridden=override_keys(overrides))


def read_yaml_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = Path(path).read_bytes()[:exc.start].count(b"\n") + 1
        raise LmlabError("not UTF-8 text", file=path, line=line) from None


def override_keys(overrides: list[str] | None) -> list[str]:
    """The key paths `--set` assigned (list items by index or name), to blame the flag for their errors."""
    return [o.split("=", 1)[0].strip() for o in overrides or [] if "=" in o]


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, written next to every artifact."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
