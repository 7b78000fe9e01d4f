"""Learning rate as a function of training progress: warm-up, then plateau, cosine or exponential decay.

Why not ``torch.optim.lr_scheduler``: runs are compared at equal wall-clock time (``max_time``), so the
decay must follow *progress* — the larger of the epoch fraction and the time fraction — not the epoch
count; and the whole state must be a few numbers that round-trip through a pickle-free checkpoint.
The rate is set before every optimiser step, so a cosine decay is smooth within an epoch too.
"""

from __future__ import annotations

import math
from typing import Any


class LearningRate:
    """``lr(step, progress, epoch) = warmup(step) · decay(progress, epoch)`` with plateau cuts on top.

    ``kind`` is ``"plateau"`` (cut by ``plateau_factor`` after ``plateau_patience`` epochs without
    improvement), ``"cosine"`` (from ``lr`` to ``min_lr`` over progress 0 → 1), ``"exponential"``
    (``gamma ** epoch``, counted from the phase's first epoch) or ``"none"``.  :meth:`restart` begins a new
    phase (e.g. MACE's stage two) from another base rate, keeping the step counter.
    """

    def __init__(self, lr: float, kind: str = "plateau", *, min_lr: float = 0.0, warmup_steps: int = 0,
                 plateau_factor: float = 0.8, plateau_patience: int = 50, gamma: float = 0.9993) -> None:
        if kind not in ("plateau", "cosine", "exponential", "none"):
            raise ValueError(f"unknown learning-rate schedule {kind!r}")
        self.base_lr, self.kind, self.min_lr = float(lr), kind, float(min_lr)
        self.warmup_steps = int(warmup_steps)
        self.plateau_factor, self.plateau_patience, self.gamma = plateau_factor, plateau_patience, gamma
        self.plateau_scale = 1.0
        self.best = math.inf
        self.bad_epochs = 0
        self.phase_start = 0.0  # progress at which the current phase began (cosine restarts from there)
        self.phase_start_epoch = 0  # epoch (0-based) at which it began (exponential decay counts from there)

    def __call__(self, step: int, progress: float, epoch: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        if self.kind == "cosine":
            span = max(1.0 - self.phase_start, 1e-12)
            x = min(max((progress - self.phase_start) / span, 0.0), 1.0)
            lr = self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * x))
        elif self.kind == "exponential":
            lr = self.base_lr * self.gamma ** max(epoch - self.phase_start_epoch, 0)
        elif self.kind == "plateau":
            lr = self.base_lr * self.plateau_scale
        else:
            lr = self.base_lr
        return max(lr, self.min_lr) * warm if self.kind != "none" else lr * warm

    def epoch_end(self, criterion: float) -> None:
        """Feed the epoch's validation criterion (plateau bookkeeping)."""
        if self.kind != "plateau":
            return
        if criterion < self.best * (1.0 - 1e-4):
            self.best, self.bad_epochs = criterion, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > self.plateau_patience:
                self.plateau_scale *= self.plateau_factor
                self.bad_epochs = 0

    def restart(self, lr: float, progress: float, epoch: int = 0) -> None:
        """Start a new phase at base rate ``lr`` from ``progress`` and (0-based) ``epoch``: no warm-up, plateau
        memory cleared, a cosine or exponential decay begun again from ``lr``."""
        self.base_lr, self.phase_start, self.phase_start_epoch = float(lr), float(progress), int(epoch)
        self.plateau_scale, self.best, self.bad_epochs, self.warmup_steps = 1.0, math.inf, 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("base_lr", "kind", "min_lr", "warmup_steps", "plateau_scale", "best",
                                              "bad_epochs", "phase_start", "phase_start_epoch")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
