"""Round trips through a real daemon: every supported value type and dtype comes back bit-exact.

One daemon serves the whole module (each test uses its own job); the restart test starts its own.
Tensors are compared by dtype, shape and raw bytes (so NaN payloads, -0.0 and bfloat16/float8 bit
patterns count), floats by their IEEE bits, containers by type, key order and key type.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ckptd_client import CheckpointManager, FailedPrecondition, Level, NotFound, StateMismatchError

from tests._ckptd_helpers import Daemon, tensor_bytes, unique_job
from tests.conftest import DaemonProc
from tests.state_factory import every_value_state, random_tensor


@pytest.fixture
def manager(mod_daemon: Daemon) -> Iterator[CheckpointManager]:
    with CheckpointManager(unique_job("rt"), rank=0, world_size=1, addr=mod_daemon.addr, on_error="raise") as m:
        yield m


# -- exact comparison ------------------------------------------------------------------------------


def float_bits(x: float) -> bytes:
    return struct.pack("<d", x)


def assert_same(orig: Any, got: Any, path: str = "<root>") -> None:
    """Exact equality of a saved value and its restored form (see module docstring)."""
    if isinstance(orig, torch.Tensor):
        assert isinstance(got, torch.Tensor), path
        assert got.dtype == orig.dtype, path
        assert got.shape == orig.shape, path
        assert tensor_bytes(got) == tensor_bytes(orig), path
    elif isinstance(orig, np.ndarray):
        assert isinstance(got, np.ndarray), path
        assert got.dtype == orig.dtype.newbyteorder("="), path
        assert got.shape == orig.shape, path
        assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(orig.astype(got.dtype)).tobytes(), path
    elif isinstance(orig, np.generic):
        assert_same(orig.item(), got, path)
    elif isinstance(orig, float):
        assert type(got) is float, path
        if math.isnan(orig):
            assert math.isnan(got), path
        else:
            assert float_bits(got) == float_bits(orig), path
    elif isinstance(orig, dict):
        assert isinstance(got, dict), path
        assert list(got) == list(orig), path
        assert [type(k) for k in got] == [type(k) for k in orig], path
        for k in orig:
            assert_same(orig[k], got[k], f"{path}.{k}")
    elif isinstance(orig, (list, tuple)):
        assert type(got) is type(orig), path
        assert len(got) == len(orig), path
        for i, (a, b) in enumerate(zip(orig, got)):
            assert_same(a, b, f"{path}.{i}")
    else:
        assert type(got) is type(orig), path
        assert got == orig, path


# -- round trips ---------------------------------------------------------------------------------


def test_every_value_type_round_trips_into_a_fresh_state(manager: CheckpointManager) -> None:
    state = every_value_state(1)
    h = manager.save(4, state)
    assert h.ok and h.nbytes > 0
    assert h.wait(Level.STAGED, timeout_s=60).level >= Level.STAGED
    assert h.wait(Level.LOCAL_DURABLE, timeout_s=60).level == Level.LOCAL_DURABLE
    out: dict[str, Any] = {}
    assert manager.restore(out) == 4
    assert manager.last_restore is not None and manager.last_restore.step == 4
    assert_same(state, out)
    # restored tensors are private copies, not views of shared memory
    out["dtypes"]["float32"].zero_()
    again: dict[str, Any] = {}
    manager.restore(again)
    assert tensor_bytes(again["dtypes"]["float32"]) == tensor_bytes(state["dtypes"]["float32"])


def test_restore_in_place_into_existing_tensors_and_arrays(manager: CheckpointManager) -> None:
    state = every_value_state(2)
    manager.save(1, state).wait(Level.STAGED, timeout_s=60)
    target = every_value_state(3)  # same structure, different contents
    target["odd"]["transposed"] = torch.zeros(6, 9).t()  # a non-contiguous destination
    # An expanded (stride-0) tensor cannot be written in place, by torch's own load_state_dict
    # either; a destination that size has to be a real tensor.
    target["odd"]["expanded"] = torch.zeros(4, 3, dtype=torch.int32)
    ids = {
        "f32": target["dtypes"]["float32"],
        "bf16": target["dtypes"]["bfloat16"],
        "t": target["odd"]["transposed"],
        "np": target["numpy"]["int32"],
        "list": target["plain"]["ints"],
        "dict": target["plain"]["int_keys"],
    }
    assert manager.restore(target) == 1
    assert_same(state, target)
    assert target["dtypes"]["float32"] is ids["f32"]
    assert target["dtypes"]["bfloat16"] is ids["bf16"]
    assert target["odd"]["transposed"] is ids["t"] and not ids["t"].is_contiguous()
    assert target["numpy"]["int32"] is ids["np"]
    assert target["plain"]["ints"] is ids["list"]
    assert target["plain"]["int_keys"] is ids["dict"]


def test_top_level_values_other_than_dicts(manager: CheckpointManager) -> None:
    t = random_tensor(torch.float64, (2, 3), torch.Generator().manual_seed(4))
    manager.save(1, t).wait(Level.STAGED, timeout_s=60)
    dst = torch.zeros(2, 3, dtype=torch.float64)
    assert manager.restore(dst, step=1) == 1
    assert_same(t, dst)
    manager.save(2, [1, (2.5, "x"), None]).wait(Level.STAGED, timeout_s=60)
    lst: list[Any] = [None, None, None]
    assert manager.restore(lst, step=2) == 2
    assert_same([1, (2.5, "x"), None], lst)
    manager.save(3, {}).wait(Level.STAGED, timeout_s=60)  # an empty shard
    out: dict[str, Any] = {"kept": 1}
    with pytest.raises(StateMismatchError, match="missing from the checkpoint: kept"):
        manager.restore(out, step=3)  # strict: a key the step lacks is named
    assert manager.restore(out, step=3, strict=False) == 3  # lenient, explicitly: left alone
    assert out == {"kept": 1}


def make_training(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 4))
    model.register_buffer("bf16_buffer", torch.randn(3).to(torch.bfloat16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2 * (seed + 1), weight_decay=0.05, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, i: int) -> None:
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(5, 8, generator=g)
    y = torch.randn(5, 4, generator=g)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    sched.step()


def test_model_optimizer_scheduler_restore_into_fresh_objects(manager: CheckpointManager) -> None:
    model, opt, sched = make_training(0)
    for i in range(3):
        train_step(model, opt, sched, i)
    manager.save(3, {"model": model, "optim": opt, "sched": sched, "epoch": 3}).wait(Level.LOCAL_DURABLE, 60)

    model2, opt2, sched2 = make_training(7)  # different init, lr, empty optimizer state
    state2: dict[str, Any] = {"model": model2, "optim": opt2, "sched": sched2, "epoch": 0}
    assert manager.restore(state2) == 3
    assert state2["model"] is model2 and state2["optim"] is opt2 and state2["sched"] is sched2
    assert state2["epoch"] == 3
    assert_same(model.state_dict(), model2.state_dict())
    assert_same(opt.state_dict(), opt2.state_dict())
    assert sched2.state_dict() == sched.state_dict()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    # training continues identically, bit for bit
    for i in range(3, 6):
        train_step(model, opt, sched, i)
        train_step(model2, opt2, sched2, i)
    assert_same(model.state_dict(), model2.state_dict())
    assert_same(opt.state_dict(), opt2.state_dict())


# -- unsupported values ------------------------------------------------------------------------------


class Opaque:
    pass


UNSUPPORTED: list[tuple[str, Any, list[str]]] = [
    ("set", {"a": {"b": {1, 2}}}, ["a.b", "set"]),
    ("object", {"opt": {"hook": Opaque()}}, ["opt.hook", "Opaque"]),
    ("tuple-key", {"d": {(1, 2): 3}}, ["d.", "(1, 2)", "keys"]),
    ("float-key", {"d": {1.5: 3}}, ["d.1.5", "keys"]),
    ("none-key", {"d": {None: 3}}, ["d.None", "keys"]),
    ("bool-key", {"d": {True: 3}}, ["d.True", "keys"]),
    ("bytes", {"blob": b"raw"}, ["blob", "bytes"]),
    ("complex", {"z": [0, 1j]}, ["z.1", "complex"]),
    ("function", {"fn": len}, ["fn"]),
    ("lambda-in-list", {"l": [1, 2, lambda: 0]}, ["l.2", "function"]),
    ("np-object", {"arr": np.array([object()], dtype=object)}, ["arr", "object"]),
    ("np-str", {"arr": np.array(["a", "b"])}, ["arr"]),
    ("np-datetime", {"arr": np.array(["2024-01-01"], dtype="datetime64[D]")}, ["arr", "datetime64"]),
    ("np-struct", {"arr": np.zeros(2, dtype=[("x", "i4"), ("y", "f4")])}, ["arr"]),
    ("sparse", {"sp": torch.eye(3).to_sparse()}, ["sp", "sparse"]),
]
if hasattr(torch, "float8_e5m2fnuz"):
    UNSUPPORTED.append(("float8-fnuz", {"w": {"q": torch.zeros(2, dtype=torch.float8_e5m2fnuz)}},
                        ["w.q", "float8_e5m2fnuz"]))


@pytest.mark.parametrize("value,fragments", [(v, f) for _, v, f in UNSUPPORTED], ids=[i for i, _, _ in UNSUPPORTED])
def test_unsupported_values_raise_type_error_naming_the_key(manager: CheckpointManager, value: Any,
                                                             fragments: list[str]) -> None:
    with pytest.raises(TypeError) as info:
        manager.save(1, {"ok": torch.ones(2), **value})
    for fragment in fragments:
        assert fragment in str(info.value)
    # nothing was saved or leased: the same step saves fine afterwards
    assert manager.latest_step() is None
    manager.save(1, {"ok": torch.ones(2)}).wait(Level.STAGED, timeout_s=60)
    assert manager.latest_step() == 1


# -- steps: explicit, latest, listing, empty jobs, world size -----------------------------------------


def test_restore_explicit_older_steps(manager: CheckpointManager) -> None:
    states = {}
    for step in (10, 20, 30):
        states[step] = every_value_state(step)
        manager.save(step, states[step]).wait(Level.LOCAL_DURABLE, timeout_s=60)
    assert manager.latest_step() == 30
    assert manager.all_steps() == [10, 20, 30]
    for step in (10, 30, 20):
        out: dict[str, Any] = {}
        assert manager.restore(out, step=step) == step
        assert_same(states[step], out)
        assert manager.last_restore is not None and manager.last_restore.served_from in ("memory", "disk")
    out = {}
    assert manager.restore(out, step="latest") == 30
    assert_same(states[30], out)
    with pytest.raises(NotFound):
        manager.restore({}, step=25)


def test_empty_job(manager: CheckpointManager) -> None:
    state = {"w": torch.ones(3)}
    assert manager.restore(state) is None
    assert torch.equal(state["w"], torch.ones(3))  # untouched
    assert manager.latest_step() is None
    assert manager.all_steps() == []
    with pytest.raises(NotFound):
        manager.restore(state, step=0)


def test_restore_with_wrong_world_size(mod_daemon: Daemon, manager: CheckpointManager) -> None:
    manager.save(5, {"w": torch.ones(3)}).wait(Level.LOCAL_DURABLE, timeout_s=60)
    with CheckpointManager(manager.job, rank=1, world_size=2, addr=mod_daemon.addr) as other:
        with pytest.raises(FailedPrecondition, match="world_size"):
            other.restore({"w": torch.zeros(3)})
        with pytest.raises(FailedPrecondition):
            other.restore({}, step=5)
        with pytest.raises(FailedPrecondition):
            other.latest_step()
    out: dict[str, Any] = {}
    assert manager.restore(out) == 5  # the right world size still restores


# -- through the disk tier after a daemon crash ----------------------------------------------------


def test_round_trip_from_disk_after_daemon_sigkill(daemon_factory: Callable[..., DaemonProc], tmp_path: Path) -> None:
    d = daemon_factory()
    job = unique_job("disk")
    state = every_value_state(5)
    with CheckpointManager(job, rank=0, world_size=1, addr=d.addr, on_error="raise") as m:
        m.save(1, {"x": torch.zeros(2)}).wait(Level.LOCAL_DURABLE, timeout_s=60)
        m.save(2, state).wait(Level.LOCAL_DURABLE, timeout_s=60)
    d.kill()
    d2 = daemon_factory(root=d.root)  # same disk, a fresh (empty) shared-memory directory
    with CheckpointManager(job, rank=0, world_size=1, addr=d2.addr, on_error="raise") as m:
        assert m.latest_step() == 2
        assert m.all_steps() == [1, 2]
        out: dict[str, Any] = {}
        assert m.restore(out) == 2
        assert m.last_restore is not None and m.last_restore.served_from == "disk"
        assert_same(state, out)
        assert m.restore(out, step=1, strict=False) == 1 and torch.equal(out["x"], torch.zeros(2))


def test_strict_restore_names_every_mismatch_and_copies_nothing(manager: CheckpointManager) -> None:
    saved = {"w": torch.arange(6, dtype=torch.float32), "b": torch.ones(2, dtype=torch.bfloat16),
             "a": np.arange(4, dtype=np.int32), "extra": 5}
    manager.save(1, saved).wait(Level.STAGED, timeout_s=60)
    w, b, a = torch.zeros(6, dtype=torch.float64), torch.zeros(3, dtype=torch.bfloat16), np.zeros(4, np.int32)
    state: dict[str, Any] = {"w": w, "b": b, "a": a, "missing": 1}
    with pytest.raises(StateMismatchError) as err:
        manager.restore(state, step=1)
    e = err.value
    assert e.missing == ["missing"] and e.unexpected == ["extra"]
    assert [m.split(" ")[0] for m in e.mismatched] == ["w", "b"]  # dtype of w, shape of b, in the message too
    assert "w (saved float32[6], state has float64[6])" in str(e) and "b (saved bfloat16[2]" in str(e)
    assert not w.any() and not b.any() and not a.any() and "extra" not in state  # nothing copied or added

    # dtype conversion, opted into: w (float64) filled in place, the same object; shapes must match
    state = {"w": w, "b": torch.zeros(2, dtype=torch.bfloat16), "a": a, "extra": 0}
    assert manager.restore(state, step=1, convert_dtype=True) == 1
    assert state["w"] is w and torch.equal(w, saved["w"].double()) and state["a"] is a and (a == saved["a"]).all()
    # lenient, explicitly: missing left alone, extra added, a mismatched tensor replaced
    loose: dict[str, Any] = {"w": torch.zeros(2), "missing": 1}
    assert manager.restore(loose, step=1, strict=False) == 1
    assert loose["missing"] == 1 and loose["extra"] == 5 and torch.equal(loose["w"], saved["w"])
