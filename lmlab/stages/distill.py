"""Distillation of a teacher (a checkpoint or an ensemble) into a student, on packed text data.

Kotha et al. (2025): distilling an ensemble into one model keeps most of the
ensemble's gain at a single model's cost; self-distillation (student and teacher
of the same size) helps too. TRL's GKDTrainer distils on chat data with a
generalised JSD and a single-model teacher; lmlab needs the Hinton loss on
pretraining / CPT rows and an ensemble teacher, so this is a small subclass of
lmlab's Trainer whose only change is the loss:

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

over the tokens that have labels, with both distributions at temperature T. With
`top_k`, the teacher keeps only its k most likely tokens (renormalised); with
`cache_teacher` too, the teacher runs once over the training rows before training
and its top-k is read from disk at every epoch (the saving grows with epochs and
with ensemble size). `data_format: chat` distils on SFT records with the loss on
assistant tokens only, so a chat teacher (or ensemble) can be compressed as well.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmlab.console import console
from lmlab.data.rows import Numbered
from lmlab.distributed import main_first
from lmlab.errors import LmlabError
from lmlab.recipe import Recipe
from lmlab.trainers import LmlabTrainer


def teacher_top_k(teacher_logits: torch.Tensor, temperature: float, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, log-probabilities) of the teacher's k most likely tokens at temperature T: what the cache holds."""
    top = torch.log_softmax(teacher_logits.float() / temperature, dim=-1).topk(top_k, dim=-1)
    return top.indices, top.values


def from_top_k(indices: torch.Tensor, logprobs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The log-distribution over the whole vocabulary that keeps only those tokens, renormalised."""
    full = torch.full((*indices.shape[:-1], vocab_size), float("-inf"), device=logprobs.device)
    return torch.log_softmax(full.scatter(-1, indices.long(), logprobs.float()), dim=-1)


def token_loss_sum(student_logits: torch.Tensor, targets: torch.Tensor, teacher: tuple, alpha: float,
                   temperature: float, top_k: int | None) -> torch.Tensor:
    """sum over tokens of alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T), for (tokens, vocab) student
    logits. `teacher` is ("logits", (tokens, vocab) logits) or ("top_k", indices, log-probabilities at T)."""
    student = student_logits.float()
    ce = torch.nn.functional.cross_entropy(student, targets, reduction="sum")
    student_logp = torch.log_softmax(student / temperature, dim=-1)
    if teacher[0] == "logits":
        teacher_logp = torch.log_softmax(teacher[1].float() / temperature, dim=-1)
        if top_k is None:
            kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum()
            return alpha * ce + (1 - alpha) * temperature ** 2 * kl
        teacher = ("top_k", *teacher_top_k(teacher_logp, 1.0, top_k))
    indices, logp = teacher[1].long(), teacher[2].float()
    logp = logp - torch.logsumexp(logp, dim=-1, keepdim=True)  # the k tokens, renormalised
    kl = (logp.exp() * (logp - student_logp.gather(-1, indices))).sum()
    return alpha * ce + (1 - alpha) * temperature ** 2 * kl


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                      alpha: float = 0.5, temperature: float = 1.0, top_k: int | None = None,
                      teacher_logp: torch.Tensor | None = None, num_items: torch.Tensor | int | None = None
                      ) -> torch.Tensor:
    """alpha * next-token CE + (1 - alpha) * T^2 * KL(teacher || student), averaged over labelled tokens, from
    whole logits (`train.tiled_loss: false`, and the reference the tiled loss is tested against).

    The teacher is given as logits, or (from a cache) as its log-distribution at temperature T. The
    sum over this batch's labelled tokens is divided by `num_items` when given: the Trainer's count
    over the whole optimizer step (every micro-batch and every rank), so that rows with different
    numbers of labels weigh the same on 1 process as on N, with or without accumulation."""
    targets = labels[:, 1:]
    keep = targets != -100
    if teacher_logp is not None:
        top = teacher_logp[:, :-1][keep].topk(min(top_k or teacher_logp.shape[-1], teacher_logp.shape[-1]), dim=-1)
        teacher = ("top_k", top.indices, top.values)
    else:
        teacher = ("logits", teacher_logits[:, :-1][keep])
    total = token_loss_sum(student_logits[:, :-1][keep], targets[keep], teacher, alpha, temperature, top_k)
    return total / (num_items if num_items is not None else keep.sum())


class DistillTrainer(LmlabTrainer):
    """lmlab's Trainer with the distillation loss; the teacher runs without gradients beside the student.

    With `tiling` "chunks" (set by the packed-rows skeleton from train.tiled_loss; for large
    vocabularies by default), neither model's logits exist in full: the student's and the teacher's
    final hidden states are projected through their heads one chunk of tokens at a time
    (lmlab.models.tiled.chunked_sum), and the backward recomputes each chunk."""

    def __init__(self, *args, teacher=None, alpha: float = 0.5, temperature: float = 1.0, top_k: int | None = None,
                 cache: dict[str, torch.Tensor] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().to(self.args.device)  # evaluation (and uncached training) runs it
        self.alpha, self.temperature, self.top_k, self.cache = alpha, temperature, top_k, cache

    def cached_teacher(self, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The teacher's cached top-k of these training rows, as a log-distribution over the vocabulary."""
        length = labels.shape[1]
        return (self.cache["indices"][rows.cpu(), :length].to(labels.device),
                self.cache["logprobs"][rows.cpu(), :length].to(labels.device))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels, rows = inputs["labels"], inputs.get("row_id")
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "row_id")}
        cached = self.cache is not None and model.training  # training rows: the teacher's top-k from disk
        if self.tiling == "chunks":
            # no logits to hand back: the evaluation asks for the loss only
            loss, outputs = self.tiled_loss(model, model_inputs, labels, rows if cached else None,
                                            num_items_in_batch), {}
        else:
            outputs = model(**model_inputs)
            teacher_logits = teacher_logp = None
            if cached:
                teacher_logp = from_top_k(*self.cached_teacher(rows, labels), outputs.logits.shape[-1])
            else:
                with torch.no_grad():
                    teacher_logits = self.teacher(**model_inputs).logits
            loss = distillation_loss(outputs.logits, teacher_logits, labels, self.alpha, self.temperature,
                                     self.top_k, teacher_logp=teacher_logp, num_items=num_items_in_batch)
        loss = self.over_global_tokens(loss, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def tiled_loss(self, model, inputs, labels, rows, num_items) -> torch.Tensor:
        from lmlab.models.ensemble import combine_logits
        from lmlab.models.tiled import chunk_tokens, chunked_sum, head_weights, last_hidden

        keep = labels[:, 1:] != -100
        hidden = last_hidden(model, inputs)[0][:, :-1][keep]
        weight, bias = head_weights(self.accelerator.unwrap_model(model))
        if rows is not None:  # the cache: k indices and log-probabilities per token
            indices, logprobs = (x[:, :-1][keep] for x in self.cached_teacher(rows, labels))
            teacher_inputs, kind = (indices, logprobs), "top_k"
        else:  # the teacher's members' hidden states; their heads run per chunk, without gradients
            members = list(getattr(self.teacher, "members", [self.teacher]))
            with torch.no_grad():
                teacher_inputs = tuple(last_hidden(m, inputs)[0][:, :-1][keep] for m in members)
            heads = [head_weights(m) for m in members]
            combine, kind = getattr(self.teacher, "combine", "logits"), "logits"

        def per_token(h, targets, *teacher):
            student = torch.nn.functional.linear(h, weight, bias)
            if kind == "logits":
                with torch.no_grad():
                    teacher = ("logits", combine_logits([torch.nn.functional.linear(t, w, b)
                                                         for t, (w, b) in zip(teacher, heads)], combine))
            else:
                teacher = ("top_k", *teacher)
            return token_loss_sum(student, targets, teacher, self.alpha, self.temperature, self.top_k)

        total = chunked_sum(hidden, per_token, labels[:, 1:][keep], *teacher_inputs, chunk=chunk_tokens(weight.shape[0]))
        return total / (num_items if num_items is not None else keep.sum())


def cache_teacher(teacher, dataset, collator, top_k: int, temperature: float, path: Path,
                  batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Run the teacher once over every training row (in row order) and keep its top-k, written atomically as
    safetensors; an existing cache for the same rows, k and T is read instead."""
    from safetensors.torch import load_file, save_file

    meta = {"rows": str(len(dataset)), "top_k": str(top_k), "temperature": str(temperature)}
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            if f.metadata() == meta:
                return load_file(str(path))
    device = next(teacher.parameters()).device
    indices, logprobs = [], []
    teacher.eval()
    for start in range(0, len(dataset), batch_size):
        batch = collator(dataset.__getitems__(list(range(start, min(start + batch_size, len(dataset))))))
        inputs = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "row_id")}
        with torch.no_grad():
            idx, logp = teacher_top_k(teacher(**inputs).logits, temperature, top_k)
        indices.append(idx.to(torch.int32).cpu())
        logprobs.append(logp.cpu())
    width = max(idx.shape[1] for idx in indices)  # chat rows vary in length: pad every row to the longest

    def padded(batches):
        return torch.cat([torch.nn.functional.pad(b, (0, 0, 0, width - b.shape[1])) for b in batches])

    tensors = {"indices": padded(indices), "logprobs": padded(logprobs)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return tensors


def chat_data(recipe, tokenizer):
    """SFT records as rows of input_ids with labels on assistant tokens only (any template), plus a
    collator that pads them; sizes like packed data, so the usual budget (epochs, tokens) applies."""
    from datasets import Dataset

    from lmlab.data.pretrain_data import PackedData
    from lmlab.stages.posttrain import load_sft_data

    records = load_sft_data(recipe, tokenizer)  # tokenised, with the assistant tokens (and end of turn) masked

    if records.assistant_mask is None:
        raise LmlabError("chat distillation trains on the assistant's tokens", field="sft.assistant_only_loss",
                         hint="leave sft.assistant_only_loss at true for distill.data_format: chat")

    def tokenise(split):
        rows = []
        for ids, mask in zip(split["input_ids"], split["assistant_masks"]):
            ids, mask = ids[:recipe.data.seq_len], mask[:recipe.data.seq_len]
            if any(mask):  # truncation can cut every assistant token: such a row teaches nothing
                rows.append({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]})
        if not rows:
            raise LmlabError(f"no record keeps an assistant token within data.seq_len={recipe.data.seq_len}",
                             field="data.seq_len", hint="raise data.seq_len")
        return Dataset.from_list(rows)

    train = tokenise(records.train)
    validation = tokenise(records.validation) if records.validation is not None else None
    return PackedData(train, validation, len(train), recipe.data.seq_len), ChatCollator(tokenizer.pad_token_id)


class ChatCollator:
    """Right-pads rows to the batch's longest; padding is masked out and never a target."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)

        def pad(values, fill):
            return torch.tensor([list(v) + [fill] * (width - len(v)) for v in values])

        batch = {"input_ids": pad([r["input_ids"] for r in rows], self.pad_id),
                 "attention_mask": pad([[1] * len(r["input_ids"]) for r in rows], 0),
                 "labels": pad([r["labels"] for r in rows], -100)}
        if "row_id" in rows[0]:
            batch["row_id"] = torch.tensor([int(r["row_id"]) for r in rows])
        return batch


def load_teacher(path: str, student_tokenizer):
    """The teacher model (or ensemble), refused when its tokenizer is not the student's."""
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.models.build import load_model

    if not Path(path).is_dir():
        raise LmlabError("teacher not found", file=path, field="distill.teacher")
    if load_tokenizer(path).get_vocab() != student_tokenizer.get_vocab():
        raise LmlabError("the teacher's tokenizer differs from the student's", file=path, field="distill.teacher",
                         hint="distil with the teacher's tokenizer (leave tokenizer.path unset)")
    return load_model(path)


def teacher_factory(recipe: Recipe):
    """The distillation trainer and its teacher, built once the training rows exist (the cache needs them)."""
    def factory(data, collator, tokenizer):
        d = recipe.distill
        teacher = load_teacher(d.teacher, tokenizer)
        extra = dict(teacher=teacher, alpha=d.alpha, temperature=d.temperature, top_k=d.top_k)
        if d.cache_teacher:  # rows carry their index, so each batch finds its teacher top-k on disk
            data.train = Numbered(data.train)
            # rank 0 runs the teacher and writes the cache; the other ranks then read the same file
            with main_first(), console().status("caching the teacher's top-k over the training rows"):
                extra["cache"] = cache_teacher(teacher, data.train, collator, d.top_k, d.temperature,
                                               recipe.run_dir / "teacher_top_k.safetensors")
        return DistillTrainer, extra
    return factory


def distill_inputs(recipe: Recipe) -> tuple:
    """What the packed-rows skeleton needs for a student: its rows (chat rows, or the default packed text)
    and the factory of its trainer (the teacher loaded and checked, its top-k cached)."""
    return chat_data if recipe.distill.data_format == "chat" else None, teacher_factory(recipe)


def run_distill(recipe: Recipe, resume: bool = False, overwrite: bool = False, checked=None) -> Path:
    """Train a student on CE + T^2 KL to the teacher; returns the final artifact directory."""
    from lmlab.stages.packed import run_packed

    return run_packed(recipe, resume, overwrite, *distill_inputs(recipe), checked=checked)
