"""The rules of docs/rules.md, each a function that returns advice with its reason and source.

Every number is a default from the seed papers; the planner prints which rule
fired, what it recommends, why, and where the rule comes from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

EVOLM = "EvoLM, arXiv:2506.16029; docs/rules.md §1"
KOTHA = "Kim, Kotha, Liang, Hashimoto, arXiv:2509.14786; docs/rules.md §2"
PLAYBOOK = "Smol Training Playbook; docs/rules.md §3"
FT = "ZeRO, LoRA, QLoRA; docs/rules.md §4"

PT_TOKENS_PER_PARAM = (80, 160)  # EvoLM: general ability plateaus past this
CPT_REPLAY = 0.16  # EvoLM: domain:general ~ 5:1
CPT_SATURATION_TOKENS_1B = (30e9, 40e9)  # EvoLM: CPT gains saturate at 1B scale
SFT_EPOCH_WINDOW = (2, 4)  # EvoLM: beyond ~4 epochs OOD falls
WEIGHT_DECAY_REGULARISED = 3.0  # Kotha et al.: ~30x the usual 0.1
DATA_EFFICIENCY = {"regularised": 2.29, "joint (ensemble + regularised)": 5.17,
                   "math CPT, 8-member ensemble": 17.5}  # Kotha et al.



@dataclass(frozen=True)
class Advice:
    rule: str
    level: Literal["info", "warn"]
    message: str
    reason: str
    source: str


def pretraining_tokens(params: int, tokens: float | None) -> Advice:
    low, high = (m * params for m in PT_TOKENS_PER_PARAM)
    if tokens is None:
        return Advice("pt-budget", "info", f"pretrain on {low:.3g}-{high:.3g} tokens ({PT_TOKENS_PER_PARAM[0]}-"
                      f"{PT_TOKENS_PER_PARAM[1]}x parameters)", "general ability plateaus past ~80-160x parameters;"
                      " always finish the LR decay and hand only the fully decayed model to the next stage", EVOLM)
    ratio = tokens / params
    if ratio < PT_TOKENS_PER_PARAM[0]:
        return Advice("pt-budget", "warn", f"{ratio:.0f} tokens/param is below {PT_TOKENS_PER_PARAM[0]}x",
                      "the model is under-trained for its size: a smaller model trained to 80-160x and fully "
                      "decayed would do better on the same compute", EVOLM)
    if ratio > PT_TOKENS_PER_PARAM[1]:
        return Advice("pt-budget", "warn", f"{ratio:.0f} tokens/param is above {PT_TOKENS_PER_PARAM[1]}x",
                      "general ability plateaus past ~160x: spend the extra compute on a larger model, or on "
                      "CPT/SFT", EVOLM)
    return Advice("pt-budget", "info", f"{ratio:.0f} tokens/param is inside the 80-160x window",
                  "past this, general ability plateaus; finish the LR decay before the next stage", EVOLM)


def cpt_replay(domain_tokens: float | None, params: int) -> list[Advice]:
    out = [Advice("cpt-replay", "info", f"mix {CPT_REPLAY:.0%} general replay into the domain data (domain:general ~5:1)",
                  "without replay, general ability collapses (catastrophic forgetting)", EVOLM)]
    if domain_tokens is not None:
        saturation = CPT_SATURATION_TOKENS_1B[0] * params / 1e9
        if domain_tokens > saturation:
            out.append(Advice("cpt-saturation", "warn",
                              f"{domain_tokens:.3g} domain tokens is past the ~{saturation:.3g}-token saturation point",
                              "CPT gains saturate around 30-40B domain tokens at the 1B scale (scaled here by "
                              "parameters); extra tokens buy little", EVOLM))
    return out


def sft_epoch_range(examples: int) -> tuple[int, int]:
    """Epochs by dataset size (<10k: 3-10, 10k-100k: 2-5, >100k: 1-3)."""
    if examples < 10_000:
        return 3, 10
    if examples < 100_000:
        return 2, 5
    return 1, 3


def default_sft_epochs(examples: int) -> int:
    """The size rule clipped to EvoLM's ~3 epochs: the lowest of the range, but not above 3 when it allows 3."""
    low, high = sft_epoch_range(examples)
    return min(max(3, low), high)


def sft_epochs(examples: int | None) -> Advice:
    if examples is None:
        return Advice("sft-epochs", "info", "SFT for ~3 epochs (keep within 2-4)",
                      "beyond ~4 epochs in-domain keeps rising while out-of-domain falls", EVOLM)
    low, high = sft_epoch_range(examples)
    epochs = default_sft_epochs(examples)
    return Advice("sft-epochs", "info", f"{examples:,} examples: {low}-{high} epochs by size; use {epochs}",
                  "epochs by dataset size (<10k: 3-10, 10k-100k: 2-5, >100k: 1-3), clipped to EvoLM's 2-4 window "
                  "where OOD still holds; hold out 10% and early-stop (patience 3-5)", f"{FT}; {EVOLM}")


def sft_epoch_warning(epochs: float) -> Advice | None:
    lo, hi = SFT_EPOCH_WINDOW
    if lo <= epochs <= hi:
        return None
    return Advice("sft-epochs", "warn", f"{epochs:g} SFT epochs is outside {lo}-{hi}",
                  "fewer under-fits; more raises in-domain scores while out-of-domain generalisation falls", EVOLM)


def learning_rate_range(params: float, method: str) -> tuple[float, float]:
    """The usual fine-tuning LR range for a pretrained model of `params` parameters (docs/rules.md §4)."""
    if method in ("lora", "qlora"):
        if params < 1e9:
            return 5e-4, 1e-3
        return (1e-4, 5e-4) if params < 20e9 else (5e-5, 2e-4)
    return (1e-5, 3e-5) if params >= 1e9 else (3e-5, 1e-4)


def learning_rate(params: int, method: str) -> Advice:
    lr = learning_rate_range(params, method)
    if method in ("lora", "qlora"):
        reason = "LoRA LR by model size: <1B 5e-4..1e-3, 7-13B 1e-4..5e-4, 30B+ 5e-5..2e-4"
    else:
        reason = "full fine-tuning needs far lower LRs than LoRA (1e-5..3e-5 at billions of parameters); " \
                 "SFT LR about 10x below pretraining"
    return Advice("lr", "info", f"{method} LR {lr[0]:.0e}-{lr[1]:.0e}", reason, f"{FT}; {PLAYBOOK}")


def preference_optimisation(sft_lr: float) -> Advice:
    return Advice("dpo", "info", f"DPO/KTO/ORPO: LR {sft_lr / 20:.1e}-{sft_lr / 5:.1e} (SFT LR / 5-20), beta 0.1, "
                  "1 epoch per round", "preference optimisation overfits after one epoch: iterate on fresh "
                  "on-policy pairs scored by a verifier or reward model", PLAYBOOK)


def post_training_split(goal: str, budget_gpu_hours: float | None) -> list[Advice]:
    out = []
    if goal == "domain-expert":
        out.append(Advice("post-split", "info", "spend ~90% of the post-training budget on SFT, the rest on RL",
                          "domain experts gain most from SFT; RL mainly lifts OOD generalisation", EVOLM))
    elif goal == "general-reasoning":
        out.append(Advice("post-split", "info", "light SFT (~1-2 epochs), then most of the budget on RL (GRPO)",
                          "RL raises out-of-domain generalisation and confidence", EVOLM))
    if budget_gpu_hours is not None and budget_gpu_hours < 100:
        out.append(Advice("skip-rl", "info", "skip RL on this budget",
                          "RL sharpens sampling of answers the model can already reach; on a small budget "
                          "SFT returns more", EVOLM))
    return out


def data_constrained(unique_tokens: float | None, wanted_tokens: float) -> list[Advice]:
    """When the budget wants more tokens than exist, repeat data the way Kotha et al. show works."""
    if unique_tokens is None or unique_tokens >= wanted_tokens:
        return []
    epochs = wanted_tokens / unique_tokens
    gains = ", ".join(f"{k} {v}x" for k, v in DATA_EFFICIENCY.items())
    return [
        Advice("data-constrained", "warn",
               f"only {unique_tokens:.3g} unique tokens for a {wanted_tokens:.3g}-token budget ({epochs:.1f} epochs)",
               "the standard recipe (more epochs, more parameters) overfits once data repeats", KOTHA),
        Advice("regularise", "info", f"use the regularised recipe: weight decay ~{WEIGHT_DECAY_REGULARISED} "
               "(30x the usual 0.1), tuned jointly with LR and epochs (`lmlab sweep`)",
               "with strong weight decay loss falls monotonically in N; judge it by the asymptote of "
               "L(N) = A/N^alpha + E", KOTHA),
        Advice("ensemble", "info", "train K ensemble members (more epochs, less weight decay than a single model), "
               "then distil into one student (keeps ~83% of the gain)",
               f"at equal parameters more members beat a bigger model; data efficiency: {gains}", KOTHA),
    ]


def stability() -> Advice:
    return Advice("stability", "info", "clip grad norm 1.0, warm up 5-10% of steps, bf16, pre-norm (QK-norm helps)",
                  "the standard guards against loss spikes", FT)
