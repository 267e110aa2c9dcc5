"""Chat data in the layouts users bring from LLaMA-Factory and TRL: JSON arrays, parquet directories,
prompt/completion records, tool calls and reasoning kept, other column and role names mapped; errors keep
naming file, line and field."""

from __future__ import annotations

import json

import pytest

from lmlab.data.chat import chat_records
from lmlab.errors import LmlabError
from lmlab.recipe import SourceSpec

ALPACA = [{"instruction": "What is 2 + 3?", "input": "", "output": "2 + 3 = 5. The answer is 5."},
          {"instruction": "Add the numbers.", "input": "4 and 4", "output": "The answer is 8.", "system": "Be brief."}]


def messages(path, **spec):
    return [m for _, _, m in chat_records(SourceSpec(kind=spec.pop("kind", "jsonl"), path=str(path), **spec))]


def test_a_json_array_file_in_alpaca_layout(tmp_path):
    path = tmp_path / "alpaca_en_demo.json"
    path.write_text(json.dumps(ALPACA, indent=2))
    first, second = messages(path)
    assert first == [{"role": "user", "content": "What is 2 + 3?"},
                     {"role": "assistant", "content": "2 + 3 = 5. The answer is 5."}]
    assert second[0] == {"role": "system", "content": "Be brief."} and second[1]["content"] == "Add the numbers.\n\n4 and 4"
    broken = [*ALPACA, {"instruction": "no output here"}]
    path.write_text(json.dumps(broken, indent=2))
    line = path.read_text()[:path.read_text().rindex("{")].count("\n") + 1  # where the third object starts
    with pytest.raises(LmlabError, match=rf"alpaca_en_demo.json:{line}: messages: unknown record layout"):
        messages(path)


def test_prompt_completion_records_plain_and_conversational(tmp_path):
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": "What is 2 + 3?", "completion": "The answer is 5."}) + "\n"
                    + json.dumps({"prompt": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "What is 1 + 1?"}],
                                  "completion": [{"role": "assistant", "content": "The answer is 2."}]}) + "\n")
    plain, chat = messages(path)
    assert [m["role"] for m in plain] == ["user", "assistant"] and plain[1]["content"] == "The answer is 5."
    assert [m["role"] for m in chat] == ["system", "user", "assistant"]


def test_tool_calls_tool_messages_and_reasoning_are_kept(tmp_path, tiny_tokenizer):
    path = tmp_path / "tools.jsonl"
    record = {"messages": [
        {"role": "user", "content": "What is 6 x 7?"},
        {"role": "assistant", "content": None, "reasoning_content": "I should call the calculator.",
         "tool_calls": [{"type": "function", "function": {"name": "multiply", "arguments": {"a": 6, "b": 7}}}]},
        {"role": "tool", "name": "multiply", "content": "42"},
        {"role": "assistant", "content": "The answer is 42.", "reasoning_content": "The tool said 42."}]}
    path.write_text(json.dumps(record) + "\n")
    (conversation,) = messages(path)
    call = conversation[1]
    assert call["content"] == "" and call["reasoning_content"] == "I should call the calculator."
    assert call["tool_calls"] == [{"type": "function", "function": {"name": "multiply",
                                                                    "arguments": '{"a": 6, "b": 7}'}}]
    assert conversation[2] == {"role": "tool", "name": "multiply", "content": "42"}
    from lmlab.data.tokenizer import chat_template
    from tests.families import family_tokenizer

    rendered = family_tokenizer("qwen3").apply_chat_template(conversation, tokenize=False)
    assert '"name": "multiply"' in rendered and "<tool_response>\n42\n</tool_response>" in rendered
    assert "<think>\nThe tool said 42.\n</think>" in rendered  # Qwen3 renders the last turn's reasoning
    think = tiny_tokenizer.apply_chat_template(conversation, tokenize=False, chat_template=chat_template("chatml_think"))
    assert "<think>\nThe tool said 42.\n</think>\n\nThe answer is 42." in think  # and so does lmlab's think template


def test_other_column_and_role_names_are_mapped(tmp_path):
    path = tmp_path / "custom.jsonl"
    path.write_text(json.dumps({"dialogue": [{"speaker": "customer", "text": "What is 2 + 3?"},
                                             {"speaker": "agent", "text": "The answer is 5."}]}) + "\n")
    with pytest.raises(LmlabError, match="unknown record layout"):
        messages(path)
    (conversation,) = messages(path, columns={"messages": "dialogue", "role": "speaker", "content": "text"},
                               roles={"customer": "user", "agent": "assistant"})
    assert conversation == [{"role": "user", "content": "What is 2 + 3?"},
                            {"role": "assistant", "content": "The answer is 5."}]
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Hi"},
                                                       {"from": "gpt", "value": "Hello."}]}]))
    assert messages(sharegpt)[0][1] == {"role": "assistant", "content": "Hello."}


def test_a_parquet_directory_of_alpaca_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "parquet"
    folder.mkdir()
    for i, part in enumerate((ALPACA[:1], ALPACA[1:])):
        pq.write_table(pa.Table.from_pylist([{k: r.get(k, "") for k in ("instruction", "input", "output", "system")}
                                             for r in part]), folder / f"part-{i}.parquet")
    assert [m[-1]["content"] for m in messages(folder, kind="parquet")] == [r["output"] for r in ALPACA]


@pytest.mark.parametrize("layout", ["alpaca_json_array", "sharegpt_json", "parquet_dir"])
def test_sft_trains_on_each_layout_with_a_qwen3_style_checkpoint(tmp_path, layout):
    """The whole path: records in the layout, the checkpoint's own template, assistant-only labels, a saved
    model that keeps the template."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from lmlab.stages.sft import run_sft
    from tests.families import family_checkpoint
    from tests.test_sft import sft_recipe

    records = [{"instruction": f"What is {i} + 2?", "output": f"{i} + 2 = {i + 2}. The answer is {i + 2}."}
               for i in range(24)]
    if layout == "alpaca_json_array":
        source = {"kind": "jsonl", "path": str(tmp_path / "data.json")}
        (tmp_path / "data.json").write_text(json.dumps(records, indent=2))
    elif layout == "sharegpt_json":
        source = {"kind": "jsonl", "path": str(tmp_path / "data.json")}
        (tmp_path / "data.json").write_text(json.dumps([{"conversations": [
            {"from": "human", "value": r["instruction"]}, {"from": "gpt", "value": r["output"]}]} for r in records]))
    else:
        (tmp_path / "pq").mkdir()
        pq.write_table(pa.Table.from_pylist(records), tmp_path / "pq" / "train.parquet")
        source = {"kind": "parquet", "path": str(tmp_path / "pq")}
    checkpoint = family_checkpoint("qwen3", tmp_path / "qwen3")
    recipe = sft_recipe(tmp_path, checkpoint, data={"train": source, "seq_len": 96},
                        train={"epochs": None, "max_steps": 2}, sft={"eval_math": 0, "validation_fraction": 0.0,
                                                                     "early_stopping_patience": None})
    final = run_sft(recipe)
    assert (final / "model.safetensors").is_file()
    assert AutoTokenizer.from_pretrained(final).chat_template == AutoTokenizer.from_pretrained(checkpoint).chat_template


def test_pretraining_text_from_a_json_array_builds_the_same_store_as_jsonl(tmp_path, tok_dir):
    """A JSON array is not line-delimited, so it is read whole rather than split into byte ranges."""
    from lmlab.data.pretrain_data import build_packed_data
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.recipe import DataConfig

    docs = [{"text": f"document {i}: " + "some words to pack " * (i % 7 + 3)} for i in range(60)]
    (tmp_path / "docs.json").write_text(json.dumps(docs, indent=2))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    tokenizer = load_tokenizer(tok_dir)
    rows = {}
    for name in ("docs.json", "docs.jsonl"):
        data = DataConfig(train={"kind": "jsonl", "path": str(tmp_path / name)}, seq_len=32, validation_fraction=0.0)
        rows[name] = build_packed_data(data, tokenizer, 0, 0).train.to_dict()["input_ids"]
    assert rows["docs.json"] and rows["docs.json"] == rows["docs.jsonl"]


def test_csv_files_of_chats_text_and_prompts(tmp_path):
    """A header row, then one record per row (cells may hold newlines); whole numbers become ints."""
    import csv

    from lmlab.data.pairs import preference_inputs
    from lmlab.data.sources import source_rows

    path = tmp_path / "alpaca.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["instruction", "input", "output"])
        writer.writerow(["What is 2 + 3?", "", "2 + 3 = 5.\nThe answer is 5."])
        writer.writerow(["Say hi", "", ""])  # an empty answer: nothing to train on
    spec = SourceSpec(kind="csv", path=str(path))
    assert SourceSpec.model_validate(str(path)).kind == "csv"
    with pytest.raises(LmlabError, match=r"alpaca.csv:4: messages: no assistant turn"):
        list(chat_records(spec))  # the first record spans lines 2-3, so the second is on line 4
    path.write_text("instruction,input,output\nWhat is 2 + 3?,,The answer is 5.\n")
    assert messages(path, kind="csv")[0][-1] == {"role": "assistant", "content": "The answer is 5."}

    text = tmp_path / "docs.csv"
    text.write_text("text,source\nfirst document,a\nsecond document,b\n")
    assert [r["text"] for r in source_rows(SourceSpec(kind="csv", path=str(text)))] == ["first document",
                                                                                       "second document"]
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,answer\nWhat is 2 + 3?,5\nWhat is 7 - 9?,-2\n")
    _, records = preference_inputs([SourceSpec(kind="csv", path=str(prompts))], 0)
    assert list(records["answer"]) == [5, -2]
