"""Talking to a checkpoint: a conversation rendered with the checkpoint's own chat template, ended at
its own stop tokens, streamed as it is generated.

`lmlab chat` is a loop around `Conversation.reply`; what it shows is what the model does when
served, since the template, the stops and the sampling settings are the checkpoint's.
"""

from __future__ import annotations

from typing import Any, Callable

from lmlab.errors import LmlabError
from lmlab.evaluate.generation import stop_ids


class Conversation:
    """The messages so far, and one method to add a user turn and the model's reply to it."""

    def __init__(self, model, tokenizer, system: str | None = None, temperature: float = 0.0, top_p: float = 1.0,
                 max_new_tokens: int = 256, seed: int = 0, template_kwargs: dict[str, Any] | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise LmlabError("the checkpoint's tokenizer has no chat template, so there is no conversation format",
                             hint="chat with a fine-tuned checkpoint, or give the tokenizer a template")
        self.model, self.tokenizer, self.system = model.eval(), tokenizer, system
        self.sampling: dict[str, Any] = (dict(do_sample=True, temperature=temperature, top_p=top_p)
                                         if temperature > 0 else dict(do_sample=False))
        self.max_new_tokens, self.seed, self.template_kwargs = max_new_tokens, seed, template_kwargs or {}
        self.messages: list[dict[str, str]] = []
        self.clear()

    def clear(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """The model's answer to `text` (streamed piece by piece to `on_text`), kept in the conversation."""
        import torch
        from transformers import TextStreamer

        self.messages.append({"role": "user", "content": text})
        inputs = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True, **self.template_kwargs).to(self.model.device)

        class Streamer(TextStreamer):
            def on_finalized_text(self, piece: str, stream_end: bool = False) -> None:
                if on_text is not None and piece:
                    on_text(piece)

        stops = stop_ids(self.model, self.tokenizer)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(self.seed + len(self.messages))
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, eos_token_id=stops,
                                      pad_token_id=self.tokenizer.pad_token_id, use_cache=True,
                                      streamer=Streamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True),
                                      **self.sampling)
        answer = self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer
