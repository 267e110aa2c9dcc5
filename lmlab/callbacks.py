"""The one callback set every stage shares: metrics (jsonl + TensorBoard), a rich progress bar,
and task / ORM evaluation during training.

Stages hand these to their HF/TRL trainer, so every stage logs the same fields
to the same files: `<run>/metrics.jsonl` (one JSON object per logged step) and
`<run>/tensorboard/`. Throughput is measured on optimizer steps only (evaluation
and checkpoint time excluded), so tokens/s and MFU describe training itself.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


class MetricsCallback(TrainerCallback):
    """Enriches every log with tokens seen, tokens/s, TFLOP/s and MFU, then writes jsonl + TensorBoard.

    It must run before the HF integrations (wandb, trackio) so they see the same
    enriched dict: `attach_callbacks` puts it first.
    """

    def __init__(self, run_dir: str | Path, tokens_per_step: int, flops_per_token: float | None = None,
                 peak_flops: float | None = None, stage: str = "train", tensorboard: bool = True,
                 fields: dict[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        self.fields = fields or {}  # constant fields on every record, e.g. the preference round
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops  # whole-job peak FLOP/s (all devices), for MFU
        self.stage = stage
        self.tensorboard = tensorboard
        self._writer = None
        self._step_started = 0.0
        self._train_seconds = 0.0
        self._interval_seconds = 0.0
        self._interval_steps = 0
        self._tokens_at_last_log = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._tokens_at_last_log = self.tokens_seen(state)  # a resumed run starts counting where it stopped
        if not state.is_world_process_zero:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.drop_records_after(state.global_step)
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard not installed: jsonl still has everything
                self._writer = None

    def drop_records_after(self, step: int) -> None:
        """A resumed (or rolled back) run redoes the steps after `step`: their old records go, so curves do not
        zigzag; the divergence guard's events stay. Records of other stages or rounds are kept."""
        from lmlab.paths import write_text_atomic

        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        lines = path.read_text().splitlines()
        mine = lambda r: r.get("stage") == self.stage and all(r.get(k) == v for k, v in self.fields.items())  # noqa
        kept = [line for line in lines if not (mine(r := json.loads(line)) and r.get("step", 0) > step
                                               and "guard/event" not in r)]
        if len(kept) != len(lines):
            write_text_atomic(path, "".join(line + "\n" for line in kept))

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = time.perf_counter() - self._step_started
        self._train_seconds += elapsed
        self._interval_seconds += elapsed
        self._interval_steps += 1

    def tokens_seen(self, state) -> int:
        """Real tokens when the trainer counts them (SFT: padding excluded), else steps x tokens per step."""
        counted = getattr(state, "num_input_tokens_seen", 0) or 0
        return int(counted) if counted else state.global_step * self.tokens_per_step

    def enrich(self, logs: dict[str, Any], state) -> None:
        seen = self.tokens_seen(state)
        logs["tokens_seen"] = seen
        if self._interval_steps and self._interval_seconds > 0 and "loss" in logs and seen:
            tokens_per_s = (seen - self._tokens_at_last_log) / self._interval_seconds
            logs["tokens_per_s"] = round(tokens_per_s, 1)
            if self.flops_per_token:
                achieved = tokens_per_s * self.flops_per_token
                logs["tflops"] = round(achieved / 1e12, 4)
                if self.peak_flops:
                    logs["mfu"] = round(achieved / self.peak_flops, 4)
            self._interval_seconds, self._interval_steps = 0.0, 0
            self._tokens_at_last_log = seen
        if "loss" in logs and isinstance(logs["loss"], float) and logs["loss"] < 50:
            logs["ppl"] = round(math.exp(logs["loss"]), 3)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not state.is_world_process_zero:
            return
        self.enrich(logs, state)
        record = {"stage": self.stage, **self.fields, "step": state.global_step, "time": round(time.time(), 3),
                  **logs}
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in logs.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{self.stage}/{key}", value, state.global_step)
            self._writer.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    @property
    def train_seconds(self) -> float:
        return self._train_seconds


class RichProgressCallback(TrainerCallback):
    """A rich progress bar with loss, tokens/s and ETA, plus one log line per logged step."""

    def __init__(self, description: str = "train"):
        self.description = description
        self._progress = None
        self._task = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        from lmlab.console import console, on_terminal

        self._progress = Progress(  # the bar only on a terminal; in a log file, one line per log step
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False,
            console=console(), disable=not on_terminal(),
        )
        self._progress.start()
        self._task = self._progress.add_task(self.description, total=state.max_steps, completed=state.global_step,
                                             loss="-", tps="-")

    def on_step_end(self, args, state, control, **kwargs):
        if self._progress is not None:
            self._progress.update(self._task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._progress is None or not logs:
            return
        fields = {}
        if "loss" in logs:
            fields["loss"] = f"{logs['loss']:.4f}"
        if "tokens_per_s" in logs:
            fields["tps"] = f"{logs['tokens_per_s']:,.0f}"
        self._progress.update(self._task, **fields)
        if "train_samples_per_second" in logs:  # the Trainer's closing summary
            self._progress.console.print(f"trained {state.global_step} steps in {logs['train_runtime']:.0f}s, "
                                         f"mean train loss {logs.get('train_loss', float('nan')):.4f}")
            return
        self._progress.console.print(format_log_line(state.global_step, state.max_steps, logs, self._eta()))

    def _eta(self) -> float | None:
        task = self._progress.tasks[0] if self._progress and self._progress.tasks else None
        return task.time_remaining if task is not None else None

    def on_train_end(self, args, state, control, **kwargs):
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def format_log_line(step: int, max_steps: int, logs: dict[str, Any], eta_seconds: float | None = None) -> str:
    """One nanoGPT-style line: step, loss, lr, grad norm, tokens/s, MFU, validation loss, ETA."""
    parts = [f"step {step}/{max_steps}"]
    shown = [("loss", "loss", ".4f"), ("mean_token_accuracy", "tok-acc", ".3f"), ("learning_rate", "lr", ".2e"),
             ("grad_norm", "gnorm", ".3f"), ("tokens_per_s", "tok/s", ",.0f"), ("mfu", "mfu", ".1%"),
             ("reward", "reward", ".3f"), ("kl", "kl", ".4f"), ("completions/mean_length", "len", ".1f"),
             ("rewards/margins", "margin", ".3f"), ("rewards/accuracies", "pref-acc", ".3f")]
    # every validation set: eval_loss, or eval_<name>_loss when a stage evaluates several (CPT: domain, replay)
    shown += [(key, "val" if key == "eval_loss" else f"val {key[5:-5]}", ".4f")
              for key in sorted(logs) if key.startswith("eval_") and key.endswith("_loss")]
    for key, label, fmt in shown:
        value = logs.get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{label} {value:{fmt}}")
    if eta_seconds is not None:
        parts.append(f"eta {int(eta_seconds) // 60}m{int(eta_seconds) % 60:02d}s")
    return " | ".join(parts)


def attach_callbacks(trainer, callbacks: list[TrainerCallback]) -> None:
    """Replace HF's tqdm/printer output with ours and run ours first, so integrations see enriched logs."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    for callback in reversed(callbacks):
        trainer.callback_handler.callbacks.insert(0, callback)


class RankStatusCallback(TrainerCallback):
    """Each step's number in this rank's status file (lmlab.distributed.report), so that when a launch fails
    its launcher can say at which step; and the tests' switch that stops a rank there."""

    def on_step_begin(self, args, state, control, **kwargs):
        from lmlab.distributed import report, stall_here

        stall_here(state.global_step + 1)
        report(step=state.global_step + 1)


class TaskEvalCallback(TrainerCallback):
    """Every `every` steps, score the model on evaluation tasks (and an ORM) and log through `metrics`.

    EvoLM's point is that loss alone stops tracking problem solving after pretraining,
    so any stage can watch task accuracy and ORM scores while it trains.
    """

    def __init__(self, metrics: MetricsCallback, tokenizer, tasks: list, every: int, samples: int = 4,
                 scorer=None):
        self.metrics, self.tokenizer, self.tasks = metrics, tokenizer, tasks
        self.every, self.samples, self.scorer = every, samples, scorer

    def evaluate(self, model, step: int) -> dict[str, float]:
        from lmlab.evaluate.evaluator import evaluate

        return evaluate(model, self.tokenizer, self.tasks, self.samples, self.scorer, seed=step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step % self.every:
            return
        from lmlab.stats import Estimate

        # every rank scores its share of the items (lmlab.distributed.map_in_chunks); rank 0 logs them
        evaluated = self.evaluate(model, state.global_step)
        if not state.is_world_process_zero:
            return

        logs: dict[str, float] = {}
        for key, value in evaluated.items():
            logs[f"task/{key}"] = float(value)
            if isinstance(value, Estimate):  # each score with its 95% interval and item count
                logs.update({f"task/{key}/ci_low": value.low, f"task/{key}/ci_high": value.high,
                             f"task/{key}/n": value.n})
        self.metrics.on_log(args, state, control, logs=logs)


class DivergenceGuard(TrainerCallback):
    """Skips the update of a step whose loss or gradient norm is non-finite or spikes far above the largest of
    the recent steps; after `patience` such steps in a row it stops training and asks for a rollback (to the last good
    checkpoint, with a lower LR), which the stage skeleton performs. Every event goes to metrics.jsonl.

    A diverged run is never saved: a model with non-finite weights is refused as an artifact, and a run that
    still diverges after `rollbacks` rollbacks ends with an error.
    """

    HISTORY = 50  # steps in the running reference
    WARMUP = 3  # steps of history before gradient spikes count (non-finite values always do)

    def __init__(self, config, metrics: MetricsCallback | None = None, loss_spikes: bool = True):
        self.config, self.metrics, self.loss_spikes = config, metrics, loss_spikes
        self.losses: list[float] = []
        self.norms: list[float] = []
        self.flagged: list[tuple[float, float]] = []  # skipped steps since the last good one
        self.bad_in_a_row = 0
        self.rollback_requested = False
        self._args = self._state = self._control = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._args, self._state, self._control = args, state, control
        self.bad_in_a_row, self.rollback_requested = 0, False
        # a (re)start judges its steps against its own history: after a rollback to the initial weights, the
        # first losses are back at the start's level and the old history (of a model that had learned) would
        # call every one of them a spike (the quickstart's SFT then stopped after two rollbacks)
        self.losses, self.norms, self.flagged = [], [], []

    def reason(self, loss: float, norm: float) -> str | None:
        """Why this step is bad, or None."""
        if not math.isfinite(loss) or not math.isfinite(norm):
            return "non-finite loss or gradient"
        # The reference is the largest of the recent steps' values, and one good step is history enough for
        # the loss (no healthy run reaches 10x its first loss; a blow-up admitted during a warm-up would hide
        # every later spike). Batches differ: with small batches from mixed sources (CPT or SFT with general
        # replay) most hold learned domain rows (loss 0.1) and some a general row (loss 2.5), which is ordinary.
        usual_loss = max(self.losses, default=0.0)
        if self.loss_spikes and usual_loss > 0 and loss > self.config.loss_spike * usual_loss:
            return f"loss {loss:.4g} > {self.config.loss_spike:g} x recent maximum {usual_loss:.4g}"
        if len(self.norms) >= self.WARMUP:
            usual_norm = max(self.norms)
            # and above the clipping threshold: a norm clipping leaves alone is no spike, however small the
            # usual one (RL steps whose groups all scored alike have gradients near zero)
            clip = (self._args.max_grad_norm if self._args is not None else None) or 0.0
            if usual_norm > 0 and norm > max(self.config.grad_spike * usual_norm, clip):
                return f"gradient norm {norm:.4g} > {self.config.grad_spike:g} x recent maximum {usual_norm:.4g}"
        return None

    def _remember(self, values: list[tuple[float, float]]) -> None:
        for loss, norm in values:
            self.losses, self.norms = (self.losses + [loss])[-self.HISTORY:], (self.norms + [norm])[-self.HISTORY:]

    def skip_step(self, loss: float, norm: float) -> bool:
        """Called by the trainer before each optimizer step (every rank, same inputs): True skips the update.

        A skipped step whose next step is good was an ordinary batch of a rarer kind (the first batch of
        general replay after many domain ones), not a divergence: it joins the history then, so batches like
        it pass from then on. Steps skipped in a row never do, and `patience` of them ask for a rollback."""
        why = self.reason(loss, norm)
        if why is None:
            self._remember([*self.flagged, (loss, norm)])
            self.flagged, self.bad_in_a_row = [], 0
            return False
        self.bad_in_a_row += 1
        if math.isfinite(loss) and math.isfinite(norm):
            self.flagged.append((loss, norm))
        self.log({"guard/event": "skip", "guard/reason": why, "guard/bad_in_a_row": self.bad_in_a_row})
        if self.bad_in_a_row >= self.config.patience and self._control is not None:
            self.rollback_requested = True
            self._control.should_training_stop = True
        return True

    def log(self, fields: dict[str, Any]) -> None:
        from lmlab.console import console

        console().print(f"[yellow]divergence guard at step {self._state.global_step + 1 if self._state else '?'}: "
                        + ", ".join(f"{k.split('/')[1]} {v}" for k, v in fields.items()) + "[/]")
        if self.metrics is not None and self._state is not None:
            self.metrics.on_log(self._args, self._state, self._control, logs=dict(fields))
