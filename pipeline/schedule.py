"""When and how fast to learn: the learning rate of each update (warm-up, then plateau halving or
a decay to the last planned step), the planned steps, and early stopping on validation BLEU."""
from __future__ import annotations

import logging
import math

import numpy as np

from pipeline.config import TrainParams
from pipeline.data import ParallelData

log = logging.getLogger(__name__)


def learning_rate(cfg: TrainParams, step: int, total_steps: int, plateau_scale: float) -> float:
    """The rate for update `step` (from 0): linear warm-up, then the plateau halvings so far, or a
    cosine/linear decay that reaches 0 at the last planned step."""
    warmup = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.lr_schedule == "plateau":
        return cfg.lr * warmup * plateau_scale
    done = min(max(step - cfg.warmup_steps, 0) / max(total_steps - cfg.warmup_steps, 1), 1.0)
    decay = 0.5 * (1 + math.cos(math.pi * done)) if cfg.lr_schedule == "cosine" else 1.0 - done
    return cfg.lr * warmup * decay


def planned_steps(cfg: TrainParams, data: ParallelData) -> int:
    """The last step a decaying schedule aims at: every epoch's batches, or max_steps if fewer."""
    if cfg.lr_schedule == "plateau":
        return 0  # not needed
    # The jitter that varies an epoch's batches is below one token, so every epoch's plan cuts the
    # same sorted lengths into the same number of batches: one unjittered plan counts them all.
    total = cfg.epochs * len(data.batches(cfg.batch_tokens))
    planned = min(total, cfg.max_steps or total)
    if cfg.warmup_steps >= planned - 1:  # steps count from 0: the decay starts at step warmup_steps + 1
        log.warning("train.warmup_steps (%d) leaves the %d planned steps no room to decay%s", cfg.warmup_steps,
                    planned, ", nor to reach train.lr" if cfg.warmup_steps > planned else "")
    return planned


def smoothed(scores: list[float], window: int) -> list[float]:
    return [float(np.mean(scores[max(0, i - window + 1): i + 1])) for i in range(len(scores))]


def should_stop_early(scores: list[float], patience: int, window: int) -> bool:
    """Stop when the mean of the last `window` validation BLEUs has not beaten its best for
    `patience` validations. Greedy BLEU on ~300 verses dips by a point or two for one epoch while
    still rising (one run dipped at epoch 4, another at 8): a raw-score patience of 2 stops on
    two such dips in a row, whereas the mean of 3 keeps rising as long as each new score beats
    the one it replaces, i.e. while the trend three epochs back is still up."""
    means = smoothed(scores, window)
    if not means:
        return False
    best = int(np.argmax(means))  # the first of equal maxima: a flat mean is no improvement
    return len(means) - 1 - best >= patience
