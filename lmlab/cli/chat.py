"""`lmlab chat` and `lmlab generate`: talk to a checkpoint, or answer a file of prompts with it.

`chat` reads turns from the terminal, or one turn per line from a pipe
(`echo "What is 2 + 3?" | lmlab chat runs/quickstart/rl/final`), so it is scriptable; the reply is
streamed as it is generated. `/clear` starts a new conversation, `/exit` (or Ctrl-D) ends it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from lmlab.errors import LmlabError

SystemOption = typer.Option(None, "--system", help="A system prompt for every conversation.")
TemperatureOption = typer.Option(0.0, "--temperature", "-t", min=0.0, help="0: greedy; above 0: sampled.")
TopPOption = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling (with --temperature > 0).")
MaxTokensOption = typer.Option(256, "--max-new-tokens", min=1, help="The longest reply, in tokens.")
SeedOption = typer.Option(0, "--seed")
ThinkOption = typer.Option(None, "--think/--no-think", help="Passed to the template as enable_thinking "
                                                             "(Qwen3-style hybrid templates).")


def _load(checkpoint: Path):
    """The model (an adapter merged into its base) and its tokenizer, without the libraries' loading bars."""
    from lmlab.console import silence_libraries
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.models.build import check_checkpoint, load_model

    silence_libraries()
    check_checkpoint(checkpoint, "CHECKPOINT")
    return load_model(checkpoint), load_tokenizer(checkpoint)


def chat(checkpoint: Path = typer.Argument(..., help="A checkpoint or LoRA adapter directory (with its tokenizer)."),
         system: Optional[str] = SystemOption, temperature: float = TemperatureOption, top_p: float = TopPOption,
         max_new_tokens: int = MaxTokensOption, seed: int = SeedOption, think: Optional[bool] = ThinkOption) -> None:
    """Chat with a checkpoint in its own template, stopping at its own end-of-turn token."""
    from lmlab.evaluate.chat import Conversation

    model, tokenizer = _load(checkpoint)
    kwargs = {} if think is None else {"enable_thinking": think}
    conversation = Conversation(model, tokenizer, system, temperature, top_p, max_new_tokens, seed, kwargs)
    interactive = sys.stdin.isatty()
    if interactive:
        typer.echo(f"chatting with {checkpoint} (/clear for a new conversation, /exit or Ctrl-D to leave)")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/clear":
            conversation.clear()
            continue
        if interactive:
            typer.echo("model> ", nl=False)
        conversation.reply(text, on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
        typer.echo("")


def generate(checkpoint: Path = typer.Argument(..., help="A checkpoint or LoRA adapter directory (with its tokenizer)."),
             prompts: Path = typer.Option(..., "--prompts", help="A jsonl of {\"prompt\": text or messages}, or a "
                                                                 "text file with one prompt per line."),
             out: Path = typer.Option(..., "--out", "-o", help="Where the jsonl of completions goes."),
             system: Optional[str] = SystemOption, temperature: float = TemperatureOption,
             max_new_tokens: int = MaxTokensOption,
             samples: int = typer.Option(1, "--samples", "-n", min=1, help="Completions per prompt."),
             batch_size: int = typer.Option(16, "--batch-size", min=1), seed: int = SeedOption) -> None:
    """Answer every prompt of a file in the checkpoint's chat template, in batches."""
    from lmlab.evaluate.generation import generate as batch_generate

    records = read_prompts(prompts)
    model, tokenizer = _load(checkpoint)
    rendered = [tokenizer.apply_chat_template(messages_of(r, system), tokenize=False, add_generation_prompt=True)
                for r in records]
    completions = batch_generate(model, tokenizer, rendered, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 do_sample=temperature > 0, temperature=temperature or 1.0,
                                 num_return_sequences=samples, seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for record, texts in zip(records, completions):
            fh.write(json.dumps({**record, "completions" if samples > 1 else "completion":
                                 texts if samples > 1 else texts[0]}, ensure_ascii=False) + "\n")
    typer.echo(f"{len(records)} prompts x {samples} -> {out}")


def read_prompts(path: Path) -> list[dict]:
    """Prompt records from a records file (jsonl, a JSON array or csv; `prompt`: a string or a list of
    messages), or plain text, one prompt per line."""
    from lmlab.data.sources import read_records

    if not path.is_file():
        raise LmlabError("prompts file not found", file=str(path), field="--prompts")
    if path.suffix.lower() not in (".jsonl", ".json", ".csv"):
        records = [{"prompt": line.strip()} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        records = []
        for number, record in read_records(path):
            prompt = record.get("prompt")
            if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt))):
                raise LmlabError("needs 'prompt': a string or a list of messages", file=str(path), line=number,
                                 field="prompt")
            records.append(record)
    if not records:
        raise LmlabError("the prompts file is empty", file=str(path), field="--prompts")
    return records


def messages_of(record: dict, system: str | None) -> list[dict]:
    """The prompt as messages, with `system` first unless the record brings its own."""
    from lmlab.data.pairs import prompt_messages

    prompt = record["prompt"]
    if isinstance(prompt, str):
        return prompt_messages(prompt, system)
    has_system = any(m.get("role") == "system" for m in prompt)
    return ([{"role": "system", "content": system}] if system and not has_system else []) + prompt
