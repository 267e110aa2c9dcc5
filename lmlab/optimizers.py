"""Muon for the hidden weight matrices, AdamW for everything else, as one optimizer.

Why one object: the HF Trainer, accelerate and the LR schedule each hold a single
`torch.optim.Optimizer`, step it, checkpoint it and scale its groups' LRs. This class
keeps `torch.optim.Muon` and `torch.optim.AdamW` inside it and shares their parameter
groups, so the schedule, the divergence guard's rollbacks and a resume reach both.

Which parameters: Muon orthogonalises the update of a matrix, which only makes sense
for the 2-D weights inside the transformer blocks (attention and MLP projections).
Embeddings, the output head, norms and biases stay with AdamW (Jordan et al., "Muon:
An optimizer for hidden layers in neural networks", 2024; modded-nanogpt and nanochat
do the same). Defaults follow nanochat's base training: Muon LR 0.02, momentum 0.95
with Nesterov, 5 Newton-Schulz steps, Keller Jordan's shape scaling of the LR.
"""

from __future__ import annotations

from typing import Any

import torch

from lmlab.errors import LmlabError
from lmlab.recipe import SHARDED_MODES

# sharding modes whose parameters are flat or partial shards: Newton-Schulz needs each whole matrix
UNSUPPORTED_SHARDING = SHARDED_MODES


def check_muon(optimizer: str, distributed: str) -> None:
    """Muon runs on one process or under DDP (every rank holds whole matrices); sharded modes are refused."""
    if optimizer == "muon" and distributed in UNSUPPORTED_SHARDING:
        raise LmlabError(f"optim.optimizer: muon does not support train.distributed: {distributed} yet "
                         "(FSDP2 and DeepSpeed hand the optimizer shards of each matrix, and Muon's "
                         "orthogonalisation needs the whole matrix)", field="optim.optimizer",
                         hint="use train.distributed: ddp (or auto without a sharding launch config), or adamw")


def embedding_weight_ids(model: torch.nn.Module) -> set[int]:
    """ids of the input embedding and output head weights (one tensor when tied): never decayed, never Muon's."""
    ids = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        ids.add(id(head.weight))
    return ids


def muon_parameters(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(Muon's names, AdamW's names): the 2-D weights outside the embeddings and the head go to Muon."""
    outer = embedding_weight_ids(model)
    muon, adamw = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (muon if param.ndim == 2 and id(param) not in outer else adamw).append(name)
    return muon, adamw


class MuonAdamW(torch.optim.Optimizer):
    """`torch.optim.Muon` on `muon_groups` and `torch.optim.AdamW` on `adamw_groups`, stepped together.

    The parameter groups are the inner optimizers' own dicts, so an LR set on `param_groups`
    (the schedule, a rollback) is the LR the inner optimizer uses. The state dict holds both
    inner state dicts; loading one rebuilds the shared groups.
    """

    def __init__(self, muon_groups: list[dict[str, Any]], adamw_groups: list[dict[str, Any]], muon: dict[str, Any],
                 adamw: dict[str, Any]):
        self.muon = torch.optim.Muon(muon_groups, **muon)
        self.adamw = torch.optim.AdamW(adamw_groups, **adamw)
        super().__init__([{"params": []}], {})
        self._share_groups()

    def _share_groups(self) -> None:
        self.param_groups = [*self.muon.param_groups, *self.adamw.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self._share_groups()

    @property
    def state(self):  # what accelerate and the Trainer read (e.g. to move state between devices)
        return {**self.muon.state, **self.adamw.state}

    @state.setter
    def state(self, value) -> None:  # Optimizer.__init__ assigns an empty state: nothing to keep
        pass


def build_muon(model: torch.nn.Module, optim, decay_names: set[str]) -> MuonAdamW:
    """The recipe's `optim` block as a MuonAdamW over `model`; AdamW decays only `decay_names`."""
    muon_names, adamw_names = muon_parameters(model)
    params = dict(model.named_parameters())
    muon_groups = [{"params": [params[n] for n in muon_names], "weight_decay": optim.muon_weight_decay}]
    adamw_groups = [{"params": [params[n] for n in adamw_names if n in decay_names], "weight_decay": optim.weight_decay},
                    {"params": [params[n] for n in adamw_names if n not in decay_names], "weight_decay": 0.0}]
    adamw_groups = [g for g in adamw_groups if g["params"]]
    return MuonAdamW(muon_groups, adamw_groups,
                     muon=dict(lr=optim.muon_lr, momentum=optim.muon_momentum, nesterov=True, ns_steps=5,
                               adjust_lr_fn="original", weight_decay=optim.muon_weight_decay),
                     adamw=dict(lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                                weight_decay=optim.weight_decay, fused=next(model.parameters()).is_cuda))
