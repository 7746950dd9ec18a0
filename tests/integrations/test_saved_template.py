"""``saved_template``: the state the integrations hand to ``restore`` is exactly the step's state.

The integrations never rely on a restore adding keys (strict restore adds none): they restore
into the structure the step's manifest describes. That structure, flattened again, must be the
saved tree (same keys, containers, plain values; every tensor of the saved dtype and shape), and
restoring into it must give back the saved bytes, including tuples, numpy arrays, bfloat16,
float8, 0-d and empty tensors, and a non-finite float.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch
from ckptd_client import CheckpointManager, Level
from ckptd_client.integrations.saved import saved_shard, saved_template, saved_value
from ckptd_client.tree import flatten

from ckptd.core.errors import IntegrityError
from tests._ckptd_helpers import tensor_bytes, unique_job
from tests.state_factory import torch_state


def test_template_is_the_saved_structure_and_restores_the_saved_bytes(daemon_factory: Any) -> None:
    d = daemon_factory()
    job = unique_job("tmpl")
    state = {**torch_state(4, 0), "rng": ("MT19937", np.arange(5, dtype=np.uint32), 2, 0, 0.0),
             "loss": float("nan"), "trainer_state": json.dumps({"global_step": 4})}
    with CheckpointManager(job, rank=0, world_size=1, addr=d.addr, gather_peers=False) as m:
        m.save(4, state).wait(Level.STAGED, timeout_s=30)  # committed in memory
        template = saved_template(m, 4)
        _, saved_tensors, saved_tree, _ = flatten(state)
        _, tmpl_tensors, tmpl_tree, _ = flatten(template)
        assert tmpl_tree == saved_tree  # keys, containers, tuples and plain values as saved
        assert [(t.name, t.dtype, t.shape) for t in tmpl_tensors] == [(t.name, t.dtype, t.shape) for t in saved_tensors]

        assert m.restore(template, step=4) == 4
        assert tensor_bytes(template["model"]["embed.weight"]) == tensor_bytes(state["model"]["embed.weight"])
        assert tensor_bytes(template["fp8"]) == tensor_bytes(state["fp8"])
        assert template["rng"][0] == "MT19937" and isinstance(template["rng"], tuple)
        assert np.array_equal(template["rng"][1], state["rng"][1]) and template["hist"].dtype == np.int16
        assert math.isnan(template["loss"]) and template["empty"].shape == (0, 4)
        assert isinstance(template["scalar"], torch.Tensor) and template["scalar"].item() == 1.5

        shard = saved_shard(m, 4)
        assert json.loads(saved_value(shard, "trainer_state")) == {"global_step": 4}
        with pytest.raises(KeyError):
            saved_value(shard, "fp8")  # a tensor, not a plain value
    with CheckpointManager(job, rank=0, world_size=2, addr=d.addr, gather_peers=False) as m2:
        with pytest.raises(IntegrityError, match="saved by 1 ranks"):
            saved_template(m2, 4)  # another world size: a clear error, not another rank's state
