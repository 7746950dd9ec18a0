"""The training loop ``bench/goodput.py`` measures: a real CPU model, AdamW, a save every step.

``build(size_bytes, width, seed)`` makes an MLP of ``width``-wide linear layers (GELU between)
with enough layers that parameters plus AdamW's two moments total at least ``size_bytes``, and
its AdamW optimizer (one warm step so the moments exist). ``train(method, ...)`` runs ``warmup``
untimed steps and then ``steps`` timed ones, each a real forward, backward and optimizer step on
a fixed random batch, and calls the method's hooks around them:

    forward + backward -> method.before_update() -> optimizer.step() -> method.after_update(step)

``before_update`` is where a method that copies in the background waits until the state may
change again; ``after_update`` is where a save of the new state starts. The seconds spent in both
hooks, plus what ``guard_wait_s()`` reports (the time a guard hook inside ``optimizer.step``
waited for a background copy since the last call), are the step's blocked time. Returns the
timed wall seconds, the blocked seconds per step and the mean seconds of the compute alone
(forward, backward, optimizer).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol


class Method(Protocol):
    """What the loop calls; see ``_goodput_methods``."""

    def before_update(self) -> None: ...

    def after_update(self, step: int) -> None: ...

    def guard_wait_s(self) -> float: ...


@dataclass
class Trainer:
    model: Any
    optimizer: Any
    batch: Any
    target: Any
    state_bytes: int
    n_tensors: int

    def state(self) -> dict[str, Any]:
        """What every method saves: the model and the optimizer (objects with state_dict())."""
        return {"model": self.model, "optimizer": self.optimizer}

    def state_dict(self) -> dict[str, Any]:
        """The same as plain state dicts (for DCP)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}


def build(size_bytes: int, width: int, batch: int, seed: int = 0) -> Trainer:
    import torch

    torch.manual_seed(seed)
    per_layer = width * width + width
    layers = max(1, math.ceil(size_bytes / (3 * 4 * per_layer)))  # fp32 weight + exp_avg + exp_avg_sq
    mods: list[Any] = []
    for i in range(layers):
        mods.append(torch.nn.Linear(width, width))
        if i + 1 < layers:
            mods.append(torch.nn.GELU())
    model = torch.nn.Sequential(*mods)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, width)
    y = torch.randn(batch, width)
    t = Trainer(model, optimizer, x, y, 0, 0)
    _step(t)  # the moments exist from here on: the state has its full size
    n_params = sum(p.numel() for p in model.parameters())
    t.state_bytes = 3 * 4 * n_params
    t.n_tensors = 3 * len(list(model.parameters()))
    return t


def _step(t: Trainer, method: Method | None = None, blocked: list[float] | None = None) -> None:
    import torch

    t.optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(t.model(t.batch), t.target)
    loss.backward()
    if method is not None and blocked is not None:
        t0 = time.perf_counter()
        method.before_update()
        blocked.append(time.perf_counter() - t0)
    t.optimizer.step()


@dataclass
class Timing:
    wall_s: float = 0.0
    blocked_s: list[float] = field(default_factory=list)


def train(t: Trainer, method: Method, steps: int, warmup: int) -> Timing:
    out = Timing()
    step = 0
    for i in range(warmup + steps):
        step += 1
        if i == warmup:
            t_start = time.perf_counter()
        pre: list[float] = []
        _step(t, method, pre)
        t0 = time.perf_counter()
        method.after_update(step)
        if i >= warmup:
            out.blocked_s.append(pre[0] + time.perf_counter() - t0 + method.guard_wait_s())
    out.wall_s = time.perf_counter() - t_start
    return out
