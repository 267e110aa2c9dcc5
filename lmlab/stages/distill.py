"""Distillation of a teacher (a checkpoint or an ensemble) into a student, on packed text data.

Kotha et al. (2025): distilling an ensemble into one model keeps most of the
ensemble's gain at a single model's cost; self-distillation (student and teacher
of the same size) helps too. TRL's GKDTrainer distils on chat data with a
generalised JSD and a single-model teacher; lmlab needs the Hinton loss on
pretraining / CPT rows and an ensemble teacher, so this is a small subclass of
lmlab's Trainer whose only change is the loss:

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

over the tokens that have labels, with both distributions at temperature T. With
`top_k`, the teacher keeps only its k most likely tokens (renormalised), which is
what a top-k logit cache would store.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmlab.errors import LmlabError
from lmlab.trainers import LmlabTrainer


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      alpha: float = 0.5, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """alpha * next-token CE + (1 - alpha) * T^2 * KL(teacher || student), averaged over labelled tokens."""
    student = student_logits[:, :-1].float()
    teacher = teacher_logits[:, :-1].float()
    targets = labels[:, 1:]
    keep = targets != -100
    ce = torch.nn.functional.cross_entropy(student[keep], targets[keep])
    teacher_logp = torch.log_softmax(teacher[keep] / temperature, dim=-1)
    if top_k is not None:
        top = teacher_logp.topk(top_k, dim=-1)
        teacher_logp = torch.full_like(teacher_logp, float("-inf")).scatter(-1, top.indices, top.values)
        teacher_logp = torch.log_softmax(teacher_logp, dim=-1)  # renormalise over the kept tokens
    student_logp = torch.log_softmax(student[keep] / temperature, dim=-1)
    teacher_p = teacher_logp.exp()
    kl = (teacher_p * (teacher_logp - student_logp)).nan_to_num().sum(-1).mean()  # 0 * -inf terms are 0
    return alpha * ce + (1 - alpha) * temperature ** 2 * kl


class DistillTrainer(LmlabTrainer):
    """lmlab's Trainer with the distillation loss; the teacher runs without gradients beside the student."""

    def __init__(self, *args, teacher=None, alpha: float = 0.5, temperature: float = 1.0, top_k: int | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().to(self.args.device)
        self.alpha, self.temperature, self.top_k = alpha, temperature, top_k

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**model_inputs)
        with torch.no_grad():
            teacher_logits = self.teacher(**model_inputs).logits
        loss = distillation_loss(outputs.logits, teacher_logits, labels, self.alpha, self.temperature, self.top_k)
        return (loss, outputs) if return_outputs else loss


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
