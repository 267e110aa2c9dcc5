"""Chat records for SFT: one `messages` layout, converters from alpaca and sharegpt, and validation.

Every record becomes `[{"role": ..., "content": ...}, ...]` before any tokenisation,
and a record that cannot train (no assistant turn, an unknown role, empty content)
is an error naming its file and line, so a bad line is found before compute.
"""

from __future__ import annotations

from typing import Any, Iterator

from lmlab.errors import LmlabError
from lmlab.recipe import SourceSpec

ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function_call": "assistant", "observation": "tool"}


def detect_layout(record: dict[str, Any]) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    raise ValueError("unknown record layout: expected 'messages', 'conversations' (sharegpt) "
                     "or 'instruction'/'output' (alpaca)")


def from_alpaca(record: dict[str, Any]) -> list[dict[str, str]]:
    """{"instruction", "input"?, "output", "system"?} -> messages; the input follows the instruction."""
    prompt = record["instruction"]
    if record.get("input"):
        prompt = f"{prompt}\n\n{record['input']}"
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


def from_sharegpt(record: dict[str, Any]) -> list[dict[str, str]]:
    """{"conversations": [{"from": "human"|"gpt"|..., "value": ...}], "system"?} -> messages."""
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    turns = record["conversations"]
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise ValueError("'conversations' must be a list of {from, value} objects")
    for turn in turns:
        speaker = turn.get("from", turn.get("role"))
        if speaker not in SHAREGPT_ROLES:
            raise ValueError(f"unknown sharegpt speaker '{speaker}'")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value", turn.get("content"))})
    return messages


def to_messages(record: dict[str, Any], layout: str = "auto") -> list[dict[str, str]]:
    layout = detect_layout(record) if layout == "auto" else layout
    if layout == "alpaca":
        return from_alpaca(record)
    if layout == "sharegpt":
        return from_sharegpt(record)
    messages = record["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("'messages' must be a list of {role, content} objects")
    return [{"role": m.get("role"), "content": m.get("content")} for m in messages]


def check_messages(messages: list[dict[str, Any]]) -> None:
    """A conversation trains only if roles are known, contents are text and an assistant speaks."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("no messages")
    for i, message in enumerate(messages):
        if message.get("role") not in ROLES:
            raise ValueError(f"message {i} has unknown role '{message.get('role')}' (known: {', '.join(sorted(ROLES))})")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} ({message['role']}) has no text content")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise ValueError("no assistant turn: nothing to train on")


def chat_records(spec: SourceSpec, layout: str = "auto", seed: int = 0) -> Iterator[tuple[str, int | None, list]]:
    """`(file, line, messages)` for each record of a source, converted and checked."""
    from lmlab.data.sources import local_files, read_jsonl

    if spec.kind == "math":
        from lmlab.data.mathgen import as_chat, math_problems

        split = "id" if spec.split == "train" else spec.split
        for i, problem in enumerate(math_problems(split, spec.num_examples, spec.seed if spec.seed is not None else seed)):
            yield f"math-{split}", i, as_chat(problem)["messages"]
        return
    if spec.kind == "jsonl":
        files = local_files(spec.path, spec.kind)
        rows = ((str(path), number, record) for path in files for number, record in read_jsonl(path))
    elif spec.kind in ("parquet", "disk", "hub"):
        from lmlab.data.sources import load_source

        dataset = load_source(spec.model_copy(update={"field": _first_column(spec)}))
        rows = ((spec.path, i + 1, dict(row)) for i, row in enumerate(dataset))
    else:
        raise LmlabError(f"a {spec.kind} source has no chat records", file=spec.path, field="data.train",
                         hint="use jsonl, parquet, a datasets directory, or math")
    count = 0
    for where, number, record in rows:
        if spec.limit is not None and count >= spec.limit:
            return
        try:
            messages = to_messages(record, layout)
            check_messages(messages)
        except (ValueError, KeyError, TypeError) as exc:
            reason = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise LmlabError(reason, file=where, line=number, field="messages") from None
        count += 1
        yield where, number, messages


def _first_column(spec: SourceSpec) -> str:
    """Arrow sources are checked for a chat column by `load_source`; this names the one to look for."""
    return spec.field if spec.field != "text" else "messages"
