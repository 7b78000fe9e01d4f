"""Exponential moving average of the weights: the model that is validated and saved.

A small class rather than ``torch.optim.swa_utils.AveragedModel`` because buffers (E0s, scale, shift,
the element lookup) must be copied verbatim, never averaged, and because its state has to round-trip
through a pickle-free checkpoint as a plain dict of tensors plus an int.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``ema ← d·ema + (1-d)·θ`` after each optimiser step, with ``d = min(decay, (1+n)/(10+n))`` so the
    average is not dominated by the random initial weights during the first steps."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        self.num_updates += 1
        for avg, new in zip(self.model.parameters(), model.parameters(), strict=True):
            avg.lerp_(new.detach(), 1.0 - decay)
        for avg, new in zip(self.model.buffers(), model.buffers(), strict=True):
            avg.copy_(new)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
        self.decay = float(state.get("decay", self.decay))
