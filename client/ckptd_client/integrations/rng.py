"""The host RNG states a resumed run needs to continue bit-identical: Python, NumPy, torch CPU.

``rng_states()`` returns them as checkpointable values (tuples, an array, a tensor);
``set_rng_states`` puts back what a restore returned (lists or tuples alike). Device RNGs (CUDA)
are not covered: the integrations are tested on CPU.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_states() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}


def set_rng_states(rng: dict[str, Any]) -> None:
    random.setstate(_tuples(rng["python"]))
    np.random.set_state(_tuples(rng["numpy"]))
    torch.random.set_rng_state(rng["cpu"])


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
