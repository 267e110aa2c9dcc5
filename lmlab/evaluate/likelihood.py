"""Log-likelihood scoring: cloze multiple choice (Smol Training Playbook) and bits per byte of text.

Cloze form scores each option as a continuation of the question; normalising the
option's log-likelihood by its number of characters keeps long options from losing
just for being long, which is the playbook's default for early-training evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

if TYPE_CHECKING:
    from lmlab.stats import Estimate

Normalisation = Literal["chars", "tokens", "none"]


@dataclass(frozen=True)
class OptionScore:
    logprob: float  # summed log-probability of the option's tokens
    tokens: int
    chars: int

    def normalised(self, how: Normalisation) -> float:
        if how == "chars":
            return self.logprob / max(1, self.chars)
        if how == "tokens":
            return self.logprob / max(1, self.tokens)
        return self.logprob


def _encode(tokenizer, text: str) -> list[int]:
    """The tokenizer's own encoding (its BOS if it adds one), unless the text already starts with BOS."""
    bos = tokenizer.bos_token
    return tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokens as lm-evaluation-harness makes them, so scores are identical: trailing
    spaces of the context move to the continuation, the two are encoded together and split at the context's
    length (encoding them apart changes the tokens where a merge crosses the boundary)."""
    if not context:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [start], _encode(tokenizer, continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = _encode(tokenizer, context + continuation), _encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def continuation_logprobs(model, tokenizer, contexts: Sequence[str], continuations: Sequence[str],
                          batch_size: int = 16) -> list[tuple[float, int]]:
    """(summed log-probability, token count) of each continuation given its context, batched and right-padded."""
    import torch

    from lmlab.models.tiled import row_token_logprobs

    results: list[tuple[float, int]] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.eval()
    for start in range(0, len(contexts), batch_size):
        rows, spans = [], []
        for context, continuation in zip(contexts[start:start + batch_size], continuations[start:start + batch_size]):
            ctx, cont = encode_pair(tokenizer, context, continuation)
            rows.append(ctx + cont)
            spans.append((len(ctx), len(ctx) + len(cont)))
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=model.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=model.device)
        with torch.no_grad():  # logprobs[:, t - 1]: of the token at t (lmlab.models.tiled: never the whole logits)
            logprobs = row_token_logprobs(model, {"input_ids": ids, "attention_mask": mask}, ids.masked_fill(mask == 0,
                                                                                                             -100))
        for row, (lo, hi) in enumerate(spans):
            if lo == 0:
                raise ValueError("a cloze context must not be empty")
            results.append((logprobs[row, lo - 1:hi - 1].sum().item(), hi - lo))
    return results


def score_options(model, tokenizer, question: str, options: Sequence[str],
                  batch_size: int = 16) -> list[OptionScore]:
    """Each option scored as the continuation of the question (options start with a space in cloze form)."""
    pairs = continuation_logprobs(model, tokenizer, [question] * len(options), list(options), batch_size)
    return [OptionScore(lp, n, len(option)) for (lp, n), option in zip(pairs, options)]


def pick(scores: Sequence[OptionScore], how: Normalisation = "chars") -> int:
    """Index of the best option under the chosen normalisation (first on ties)."""
    values = [s.normalised(how) for s in scores]
    return values.index(max(values))


def text_bits_per_byte(model, tokenizer, texts: Sequence[str], max_length: int = 1024) -> "Estimate":
    """Bits per UTF-8 byte of `texts` under the model, with a bootstrap interval over the texts.

    Each text is scored in full after a document-start token (BOS, else EOS, as a
    packed pretraining row would see it); a text longer than `max_length` tokens
    counts only the bytes of the tokens scored. The estimate keeps each text's bits and
    bytes, so two models are compared document by document.
    """
    import math

    import torch

    from lmlab.distributed import map_in_chunks
    from lmlab.models.tiled import row_token_logprobs
    from lmlab.stats import Estimate

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("bits per byte needs a BOS or EOS token to start each text")
    model.eval()

    def bits_and_bytes(chunk: Sequence[str], first: int) -> list[tuple[float, int] | None]:
        scored: list[tuple[float, int] | None] = []
        for text in chunk:
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = encoded["input_ids"][: max_length - 1]
            if not ids:
                scored.append(None)
                continue
            end = encoded["offset_mapping"][len(ids) - 1][1]
            row = torch.tensor([[start] + ids], device=model.device)
            with torch.no_grad():
                nll = -row_token_logprobs(model, {"input_ids": row}, row).sum().item()
            scored.append((nll / math.log(2), len(text[:end].encode("utf-8"))))
        return scored

    # under a launcher each rank scores a share of the texts (every rank must call this)
    scored = [pair for pair in map_in_chunks(list(texts), 4, bits_and_bytes) if pair is not None]
    if not sum(size for _, size in scored):
        raise ValueError("bits per byte needs a non-empty text")
    return Estimate([bits for bits, _ in scored], [size for _, size in scored], binary=False)


def packed_rows_loss(model, rows, batch_size: int = 32) -> float:
    """Mean next-token CE over packed rows (lmlab.data.rows.PackedRows; the trainer's own eval loss), for any
    model, an ensemble included: the studies score every run and ensemble on the same held-out rows."""
    nll, tokens = packed_rows_nll(model, rows, batch_size)
    return float(nll.sum() / tokens.sum())


def packed_rows_nll(model, rows, batch_size: int = 32):
    """Each packed row's summed next-token NLL and its count of scored tokens (numpy arrays): the parts of
    `packed_rows_loss` that a study resamples to put a paired interval on a difference between models."""
    import numpy as np
    import torch

    from lmlab.models.tiled import row_token_logprobs

    nll, tokens = [], []
    model.eval()
    for start in range(0, len(rows), batch_size):
        batch = rows.columns(range(start, min(start + batch_size, len(rows))))
        ids, pos, labels = (torch.as_tensor(batch[k]) for k in ("input_ids", "position_ids", "labels"))
        with torch.no_grad():
            logprobs = row_token_logprobs(model, {"input_ids": ids, "position_ids": pos}, labels)
        nll.append(-logprobs.double().sum(dim=1).numpy())
        tokens.append((labels[:, 1:] != -100).sum(dim=1).numpy())
    return np.concatenate(nll), np.concatenate(tokens)
