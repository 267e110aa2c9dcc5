"""Chat records for SFT: one `messages` layout, converters from alpaca, sharegpt and prompt/completion,
renaming of other column and role names, and validation.

Every record becomes `[{"role": ..., "content": ...}, ...]` before any tokenisation,
and a record that cannot train (no assistant turn, an unknown role, empty content)
is an error naming its file and line, so a bad line is found before compute.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

from lmlab.errors import LmlabError
from lmlab.recipe import SourceSpec

ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function_call": "assistant", "observation": "tool"}


# what a message may carry besides role and content, kept for templates that render it (Qwen3's tools
# and thinking, a think template's reasoning)
MESSAGE_EXTRAS = ("tool_calls", "tool_call_id", "name", "reasoning_content")


def chat_features(template_kwargs: bool = False):
    """The on-disk schema of chat records: every message has every field (None where absent), so records
    with tool calls or reasoning and records without them share one table."""
    from datasets import Features, List, Value

    text = Value("string")
    message = {"role": text, "content": text, "name": text, "tool_call_id": text, "reasoning_content": text,
               "tool_calls": List({"type": text, "function": {"name": text, "arguments": text}})}
    features = {"messages": List(message), "doc_id": text}
    if template_kwargs:
        features["chat_template_kwargs"] = {"enable_thinking": Value("bool")}
    return Features(features)


def detect_layout(record: dict[str, Any]) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    raise ValueError("unknown record layout: expected 'messages', 'conversations' (sharegpt), "
                     "'instruction'/'output' (alpaca) or 'prompt'/'completion'")


def remap(record: dict[str, Any], columns: dict[str, str], roles: dict[str, str]) -> dict[str, Any]:
    """A record written with other names, renamed to lmlab's (`columns`: lmlab's name -> the file's;
    `role` and `content` name the keys inside each message; `roles` renames the speakers)."""
    if not columns and not roles:
        return record
    out = dict(record)
    for ours, theirs in columns.items():
        if ours not in ("role", "content") and theirs in record:
            out[ours] = record[theirs]
    role_key, content_key = columns.get("role"), columns.get("content")
    for key in ("messages", "conversations"):
        if isinstance(out.get(key), list):
            out[key] = [_remap_message(m, role_key, content_key, roles) if isinstance(m, dict) else m
                        for m in out[key]]
    return out


def _remap_message(message: dict, role_key: str | None, content_key: str | None, roles: dict[str, str]) -> dict:
    role = message.get(role_key) if role_key else message.get("role", message.get("from"))
    content = message.get(content_key) if content_key else message.get("content", message.get("value"))
    rest = {k: v for k, v in message.items() if k not in {role_key, content_key, "role", "content", "from", "value"}}
    return {**rest, "role": roles.get(role, role), "content": content}


def from_prompt_completion(record: dict[str, Any]) -> list[dict[str, Any]]:
    """TRL's {"prompt", "completion"}, each a string or a list of messages -> one conversation."""
    def turns(value, role):
        return [{"role": role, "content": value}] if isinstance(value, str) else list(value)

    return turns(record["prompt"], "user") + turns(record["completion"], "assistant")


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


def to_messages(record: dict[str, Any], layout: str = "auto") -> list[dict[str, Any]]:
    layout = detect_layout(record) if layout == "auto" else layout
    if layout == "alpaca":
        return from_alpaca(record)
    if layout == "sharegpt":
        return from_sharegpt(record)
    messages = from_prompt_completion(record) if layout == "prompt_completion" else record["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("'messages' must be a list of {role, content} objects")
    return [normalise_message(m) for m in messages]


def normalise_message(message: dict[str, Any]) -> dict[str, Any]:
    """Role and content, plus the extras a template may render; a tool call's arguments become JSON text
    (every record then has the same shape on disk, and templates print strings as they are)."""
    out = {"role": message.get("role"), "content": message.get("content")}
    for key in MESSAGE_EXTRAS:
        if message.get(key) is not None:
            out[key] = message[key]
    if out.get("tool_calls"):
        if not isinstance(out["tool_calls"], list) or not all(isinstance(c, dict) for c in out["tool_calls"]):
            raise ValueError("'tool_calls' must be a list of {type, function: {name, arguments}} objects")
        out["tool_calls"] = [_tool_call(call) for call in out["tool_calls"]]
        if out["content"] is None:
            out["content"] = ""  # an assistant turn that only calls a tool
    return out


def _tool_call(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    return {"type": call.get("type", "function"),
            "function": {"name": function.get("name"),
                         "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}}


def check_messages(messages: list[dict[str, Any]]) -> None:
    """A conversation trains only if roles are known, contents are text and an assistant speaks."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("no messages")
    for i, message in enumerate(messages):
        if message.get("role") not in ROLES:
            raise ValueError(f"message {i} has unknown role '{message.get('role')}' (known: {', '.join(sorted(ROLES))})")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} ({message['role']}) has no text content")
    if not any(m["role"] == "assistant" and (m["content"].strip() or m.get("tool_calls")) for m in messages):
        raise ValueError("no assistant turn: nothing to train on")


def chat_records(spec: SourceSpec, layout: str = "auto", seed: int = 0) -> Iterator[tuple[str, int | None, list]]:
    """`(file, line, messages)` for each record of a source, converted and checked."""
    from lmlab.data.sources import local_files, read_records

    if spec.kind == "math":
        from lmlab.data.mathgen import as_chat, source_problems

        split = "id" if spec.split == "train" else spec.split
        for i, problem in enumerate(source_problems(spec, seed)):
            yield f"math-{split}", i, as_chat(problem)["messages"]
        return
    if spec.kind in ("jsonl", "csv"):
        files = local_files(spec.path, spec.kind)
        rows = ((str(path), number, record) for path in files for number, record in read_records(path))
    elif spec.kind == "parquet":
        rows = parquet_records(spec)
    elif spec.kind in ("disk", "hub"):
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
            messages = to_messages(remap(record, spec.columns, spec.roles), layout)
            check_messages(messages)
        except (ValueError, KeyError, TypeError) as exc:
            reason = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise LmlabError(reason, file=where, line=number, field="messages") from None
        count += 1
        yield where, number, messages


def parquet_records(spec: SourceSpec) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """`(file, row, record)` with every column of each row of a parquet file or directory (any layout)."""
    from lmlab.data.sources import local_files, open_parquet

    for path in local_files(spec.path, spec.kind):
        table = open_parquet(path)
        number = 0
        for batch in table.iter_batches():
            for record in batch.to_pylist():
                number += 1
                yield str(path), number, record


def _first_column(spec: SourceSpec) -> str:
    """Arrow sources are checked for a chat column by `load_source`; this names the one to look for."""
    return spec.field if spec.field != "text" else "messages"
