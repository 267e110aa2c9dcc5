"""The next-token loss in tiles: never the whole (tokens, vocabulary) logits at once.

For a 128k vocabulary the logits of one 4k-token row are 2 GB in fp32, and the plain loss
step holds several copies (the logits, their fp32 upcast, the softmax's gradient); that,
not the weights, bounds the context a small GPU fits. Two ways, the same loss and gradients:

- on CUDA with Triton, pretraining and CPT reuse TRL's fused LM head
  (`trl.trainer.utils.add_fused_lm_head`): the head is applied to tiles of tokens x
  vocabulary entries folded into running log-sum-exp statistics by a Triton kernel, and the
  backward recomputes each tile;
- elsewhere (and for distillation, which needs the student's whole distribution per token
  for its KL to the teacher) `chunked_sum` applies a per-token loss to chunks of tokens under
  activation checkpointing: one chunk's logits exist at a time, in the forward and again in
  the backward. TRL's kernel without Triton works on 4096 x 32768 tiles with several
  tile-sized temporaries, which on CPU saves little (benchmarks/loss_memory.py).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

from lmlab.plan import memory
from lmlab.plan.memory import chunk_tokens  # 128 MiB of fp32 logits a chunk: 256 tokens of a 128k vocabulary

TILED = "lmlab_tiled_head"  # marks a model whose forward takes fused_lm_head=True
Tiling = Literal["fused", "chunks", "off"]


def tiling_for(requested: bool | str, tokens: int, vocab_size: int) -> Tiling:
    """TRL's fused head where its Triton kernel runs, lmlab's checkpointed chunks elsewhere; `auto` tiles
    only when one micro-batch's fp32 logits (`tokens` x `vocab_size`) would exceed one chunk."""
    from lmlab.models.build import cuda, installed

    return memory.tiling_choice(requested, tokens, vocab_size, cuda() and installed("triton"))


def add_tiled_head(model) -> None:
    """Patch `model` (before any PEFT or DDP wrapping) so `model(..., labels=..., fused_lm_head=True)` returns the
    loss and per-token log-probabilities computed in tiles; without the flag its forward is unchanged."""
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model)
    setattr(model, TILED, True)


def has_tiled_head(model) -> bool:
    inner = getattr(model, "module", model)  # DDP
    return bool(getattr(inner, TILED, False))


def last_hidden(model, inputs: dict[str, torch.Tensor]):
    """(final normed hidden states, the forward's output) with the logits of the last position only: the head
    is applied in chunks. Called through the wrapper (DDP) so gradients are synchronised as usual."""
    out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1], out


def head_weights(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output head's weight and bias, whole (an FSDP2 shard is gathered once, not once per chunk)."""
    from torch.distributed.tensor import DTensor

    head = getattr(model, "module", model).get_output_embeddings()
    weight, bias = head.weight, head.bias
    if isinstance(weight, DTensor):
        weight, bias = weight.full_tensor(), bias.full_tensor() if bias is not None else None
    return weight, bias


def chunked_sum(hidden: torch.Tensor, per_token: Callable[..., torch.Tensor], *per_token_inputs: torch.Tensor,
                chunk: int) -> torch.Tensor:
    """sum over chunks of per_token(hidden_chunk, *inputs_chunk), where `per_token` applies the head and returns
    the chunk's summed loss: one chunk of logits exists at a time.

    `hidden` is (tokens, hidden size); each of `per_token_inputs` has tokens as its first dimension.
    Each chunk runs under non-reentrant activation checkpointing, so the backward recomputes that
    chunk's logits instead of keeping them: the gradients equal the plain computation's.
    """
    from torch.utils.checkpoint import checkpoint

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        piece = [x[start:start + chunk] for x in (hidden, *per_token_inputs)]
        total = total + checkpoint(per_token, *piece, use_reentrant=False)
    return total


def chunked_cross_entropy(model, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
                          num_items: torch.Tensor | int | None = None) -> torch.Tensor:
    """The model's next-token cross-entropy (summed over labelled tokens, divided by `num_items`, else their
    count), from chunks of logits; a mixture of experts' load-balancing loss is added as its forward would."""
    import torch.nn.functional as F

    config = getattr(model, "module", model).config
    routed = getattr(config, "output_router_logits", False)
    keep = labels[:, 1:] != -100
    hidden, out = last_hidden(model, {**inputs, **({"output_router_logits": True} if routed else {})})
    weight, bias = head_weights(model)

    def per_token(h, targets):
        return F.cross_entropy(F.linear(h, weight, bias).float(), targets, reduction="sum")

    total = chunked_sum(hidden[:, :-1][keep], per_token, labels[:, 1:][keep], chunk=chunk_tokens(weight.shape[0]))
    loss = total / (num_items if num_items is not None else keep.sum())
    if routed and getattr(out, "aux_loss", None) is not None:
        loss = loss + config.router_aux_loss_coef * out.aux_loss.to(loss.device)
    return loss


def row_token_logprobs(model, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each next-token label, (rows, length - 1), 0 where the label is -100, without
    gradients: from TRL's tiles when the model has its fused head, else from chunks of logits (an ensemble,
    which has no single head, from its combined logits). Training rows, held-out rows and the evaluation's
    likelihoods all score through here."""
    import torch.nn.functional as F

    if has_tiled_head(model):
        return model(**batch, labels=labels, fused_lm_head=True).log_probs.float()
    if not hasattr(getattr(model, "module", model), "get_output_embeddings"):  # an ensemble: combined logits
        logits = model(**batch).logits[:, :-1].float()
        targets = labels[:, 1:]
        return -F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none") \
            * (targets != -100)
    hidden, _ = last_hidden(model, batch)
    weight, bias = head_weights(model)
    targets = labels[:, 1:].reshape(-1)
    flat = hidden[:, :-1].reshape(targets.shape[0], -1)
    logp = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    step = chunk_tokens(weight.shape[0])
    for start in range(0, targets.shape[0], step):
        logits = F.linear(flat[start:start + step], weight, bias).float()
        logp[start:start + step] = -F.cross_entropy(logits, targets[start:start + step], ignore_index=-100,
                                                    reduction="none")
    return logp.view(labels.shape[0], -1)
