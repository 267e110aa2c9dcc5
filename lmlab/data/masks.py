"""Which tokens of a conversation SFT trains on: the assistant's, and the token that ends each turn, for
any chat template.

The mask is made one of three ways, in this order, and the run records which (`assistant_mask`):
- `markers`: the template marks assistant turns with `{% generation %}` (transformers returns the mask);
- `trl`: TRL ships a training version of the family's template with those markers (Qwen, Llama 3, Gemma,
  Phi-3, DeepSeek, ...);
- `turns`: neither (a community fine-tune's template, a merge's): each assistant turn is located by
  rendering the conversation up to it, with the generation prompt, and through it. Every render must be a
  prefix of the next one (the template is prefix-consistent); the text between the two is the reply and
  whatever the template writes to close it. A template that rewrites earlier turns (one that drops past
  reasoning, say) is refused, naming the turn and the first character that differs. (axolotl locates turns
  the same way; LLaMA-Factory keeps its own template definitions instead.)

Whichever way, the end-of-turn token the template closes a reply with is inside the mask: a model never
trained to produce it never stops (axolotl #3754, LLaMA-Factory #7454, TRL #5988). Markers that stop before
it are extended over it, and a template where no such token follows a reply gets a warning.
"""

from __future__ import annotations

import warnings
from typing import Any

from lmlab.errors import LmlabError

PROBE = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say one."},
         {"role": "assistant", "content": "One."}, {"role": "user", "content": "And two?"},
         {"role": "assistant", "content": "Two."}]


def mask_method(tokenizer) -> tuple[str, str | None]:
    """(method, template to render with): the template's own markers, TRL's training version, or turns.
    Renders nothing: `check_template` is what tries the template out, once, before compute."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if not tokenizer.chat_template:
        raise LmlabError("the tokenizer has no chat template", field="sft.chat_template",
                         hint="set sft.chat_template: chatml on a vocabulary with <|im_start|> and <|im_end|>")
    if has_generation_markers(tokenizer.chat_template):
        return "markers", tokenizer.chat_template
    try:
        patched = get_training_chat_template(tokenizer)
    except ValueError:
        patched = None
    if patched is not None and has_generation_markers(patched):
        return "trl", patched
    return "turns", tokenizer.chat_template


def check_template(tokenizer) -> str:
    """The mask method for this template, tried on a probe conversation: a template whose turns cannot be
    located is refused, one whose replies end with no end-of-turn token to train gets a warning."""
    method, template = mask_method(tokenizer)
    if method == "turns":
        turn_spans(tokenizer, PROBE)
    end_of_turn_trained(tokenizer, method, template)
    return method


def _render(tokenizer, messages, template: str | None = None, generation: bool = False, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation,
                                         chat_template=template, **kwargs)


def _not_a_prefix(shorter: str, longer: str, what: str, where: str | None) -> LmlabError:
    at = next((i for i, (a, b) in enumerate(zip(shorter, longer)) if a != b), min(len(shorter), len(longer)))
    return LmlabError(f"the chat template is not prefix-consistent: {what} changes what it rendered before "
                      f"(first difference at character {at}: {shorter[at:at + 24]!r} became {longer[at:at + 24]!r})",
                      file=where, field="sft.chat_template",
                      hint="assistant-only loss needs a template that renders earlier turns the same way; use one "
                           "with {% generation %} markers, or set sft.assistant_only_loss: false")


def _within(tokenizer, part: str, whole: str, what: str, where: str | None) -> int:
    """Where `part` (a render of the first turns) ends inside `whole` (a render of more turns). A template may
    close every conversation with a tail (Phi-3 appends EOS when no generation prompt follows): a render that
    is a prefix of `whole` once that tail, whole tokens of it, is dropped still counts."""
    if whole.startswith(part):
        return len(part)
    common = next((i for i, (a, b) in enumerate(zip(part, whole)) if a != b), min(len(part), len(whole)))
    starts = [a for a, _ in tokenizer(part, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    for cut in sorted((a for a in starts if a <= common), reverse=True):
        if whole.startswith(part[:cut]) and whole.endswith(part[cut:]):
            return cut
    raise _not_a_prefix(part, whole, what, where)


NEXT_TURN = {"role": "user", "content": "lmlab-next-turn"}


def turn_spans(tokenizer, messages: list[dict[str, Any]], where: str | None = None,
               **kwargs) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and each assistant turn's character span: from the end of the prompt that
    precedes it (generation prompt included) to where the next turn would begin, trailing whitespace left
    out. The last turn is measured against the conversation continued by one more user turn, so what a
    template writes only at the very end (Phi-3's EOS) is not counted as part of the reply."""
    full = _render(tokenizer, messages, **kwargs)
    try:
        continued = _render(tokenizer, [*messages, NEXT_TURN], **kwargs)
    except Exception:  # a template that refuses a trailing user turn: the conversation's end is the turn's
        continued = full
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation=True, **kwargs) if i else ""
        through = _render(tokenizer, messages[:i + 1], **kwargs)
        start = _within(tokenizer, before, through, f"rendering turn {i + 1} (assistant)", where)
        if start != len(before):
            raise _not_a_prefix(before, through, f"rendering turn {i + 1} (assistant)", where)
        end = _within(tokenizer, through, continued, f"rendering the turns after turn {i + 1}", where)
        if not full.startswith(through[:end]):
            raise _not_a_prefix(through[:end], full, f"rendering the turns after turn {i + 1}", where)
        spans.append((start, max(len(through[:end].rstrip()), start)))
    return full, spans


def _closing_ids(tokenizer) -> set[int]:
    """The special tokens that end a turn (what generation stops on), EOS aside when the template has its own."""
    from lmlab.data.tokenizer import end_of_turn_ids

    ids = end_of_turn_ids(tokenizer)
    return set(ids[1:] or ids)


def masked_ids(tokenizer, messages: list[dict[str, Any]], method: str, template: str | None,
               where: str | None = None, **kwargs) -> dict[str, list[int]]:
    """input_ids and assistant_masks of one conversation, the end-of-turn token inside each assistant span."""
    if method == "turns":
        text, spans = turn_spans(tokenizer, messages, where, **kwargs)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = [int(any(lo <= a < hi for lo, hi in spans)) for a, _ in encoded["offset_mapping"]]
        ids = encoded["input_ids"]
    else:
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, chat_template=template,
                                                return_assistant_tokens_mask=True, **kwargs)
        ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
    closing = _closing_ids(tokenizer)
    for i in range(1, len(ids)):  # a closing token right after a masked span belongs to the reply
        if mask[i - 1] and not mask[i] and ids[i] in closing:
            mask[i] = 1
    return {"input_ids": list(ids), "assistant_masks": mask}


def end_of_turn_trained(tokenizer, method: str, template: str | None) -> bool:
    """Whether every assistant turn of a probe conversation has a closing token inside its mask; warns if not."""
    enc = masked_ids(tokenizer, PROBE, method, template)
    closing = _closing_ids(tokenizer)
    turns, inside, previous = 0, 0, 0
    for token, bit in zip(enc["input_ids"], enc["assistant_masks"]):
        if bit and not previous:
            turns += 1
        if bit and token in closing:
            inside += 1
        previous = bit
    trained = turns > 0 and inside >= turns
    if not trained:
        warnings.warn("the chat template closes an assistant reply with no end-of-turn token the loss can train "
                      f"(found {inside} in {turns} replies): the model may never learn to stop", stacklevel=2)
    return trained
