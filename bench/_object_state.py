"""The bytes bench/object.py moves: each step's state, and the same bytes as one tier-level shard.

``build_step`` makes one step of ``--state`` ``random`` (incompressible bytes), ``gpt`` (a
mixed-precision GPT-like state) or ``finetune`` (a frozen base and small adapters), as the state
the daemons save and the ``ShardEntry`` plus bytes the tier-level side stores (its tensors' dtypes
kept, so the codecs see what a daemon would). ``tensors_of``, ``raw`` and ``zeros_like`` serve the
bit-exact check of a daemon restore. Nothing here is timed.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from _object_procs import CHUNK_BYTES

from ckptd.core.integrity import chunk_crcs
from ckptd.core.layout import TensorEntry
from ckptd.core.manifest import ShardEntry
from tests.state_factory import finetune_state, gpt_state, state_shard


def shard_entry(data: memoryview) -> ShardEntry:
    n = data.nbytes
    return ShardEntry(0, n, CHUNK_BYTES, tuple(chunk_crcs(data, CHUNK_BYTES)),
                      (TensorEntry("state", "uint8", (n,), 0, n),), {"d": [["state", {"t": 0}]]})


def build_step(kind: str, step: int, nbytes: int) -> tuple[dict[str, Any], ShardEntry, bytes]:
    """(state for the daemons, tier-level entry, its bytes) of one step of about nbytes."""
    if kind == "random":
        data = os.urandom(nbytes)
        return {"w": np.frombuffer(data, dtype=np.uint8)}, shard_entry(memoryview(data)), data
    if kind == "gpt":
        state = gpt_state(step, max(1, nbytes // 14))  # 14 bytes a parameter
    else:
        state = finetune_state(1, step, max(64, int(nbytes / (2 + 14 / 64))))
    entry, data = state_shard(0, state, CHUNK_BYTES)
    return state, entry, data


def tensors_of(state: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(tensors_of(v, f"{prefix}{k}."))
        elif isinstance(v, (torch.Tensor, np.ndarray)):
            out[prefix + k] = v
    return out


def raw(t: Any) -> bytes:
    """The bytes of a torch tensor or numpy array."""
    if isinstance(t, torch.Tensor):
        return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return bytes(np.ascontiguousarray(t).tobytes())


def zeros_like(state: Any) -> Any:
    if isinstance(state, dict):
        return {k: zeros_like(v) for k, v in state.items()}
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    if isinstance(state, np.ndarray):
        return np.zeros_like(state)
    return state
