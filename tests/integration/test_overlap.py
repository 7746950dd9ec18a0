"""Overlapped saves (client/ckptd_client/save/overlap.py): ``save(..., overlap=True)`` returns once the
copy is issued; the optimizer guard makes ``opt.step`` wait for the copy, and no longer; without
the guard a state changed during the copy refuses the save (StateChangedDuringCopy) and nothing
of that step is committed, so a restore brings back the step before it, intact."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from ckptd_client import CheckpointManager, Level, StateChangedDuringCopy

from tests._ckptd_helpers import Daemon
from tests.state_factory import adamw_trainer

WIDTH = 1536  # two layers + AdamW moments: about 54 MiB, a copy of several ms


def _snapshot(state: Any) -> Any:
    if isinstance(state, dict):
        return {k: _snapshot(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_snapshot(v) for v in state]
    return state.clone() if isinstance(state, torch.Tensor) else state


def _assert_equal(got: Any, want: Any) -> None:
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for k in want:
            _assert_equal(got[k], want[k])
    elif isinstance(want, list):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _assert_equal(g, w)
    elif isinstance(want, torch.Tensor):
        assert torch.equal(got, want)
    else:
        assert got == want


def _restored(mgr: CheckpointManager, seed: int, device: str = "cpu") -> tuple[int | None, Any]:
    _, _, state, _ = adamw_trainer(seed + 1, WIDTH, device)  # same shapes, other values
    into = state()
    return mgr.restore(into), into


def test_guard_waits_for_the_copy_and_no_longer(mod_daemon: Daemon) -> None:
    _, opt, state, backward = adamw_trainer(1, WIDTH)
    with CheckpointManager("overlap-guard", rank=0, world_size=1, addr=mod_daemon.addr, on_error="raise") as mgr:
        backward()
        want = _snapshot(state())
        t0 = time.perf_counter()
        handle = mgr.save(1, state(), overlap=True, optimizers=(opt,))
        returned_s = time.perf_counter() - t0
        t_step = time.perf_counter()
        opt.step()  # the guard holds it until the copy is done
        assert handle.copy is not None and handle.copy.copied.is_set()
        waits = mgr._overlap.guard_waits_s
        assert len(waits) == 1, "the optimizer step should have found the copy under way"
        assert mgr.guard_wait_s == waits[0]
        assert handle.copy.copied_at <= t_step + waits[0] + 1e-3  # it waited for the copy...
        assert waits[0] <= handle.copy.copied_at - t_step + 0.02  # ...and not for more
        assert returned_s < handle.copy.copied_at - t0  # save returned before the copy ended
        handle.wait(Level.STAGED, timeout_s=60)
        assert not torch.equal(state()["model"]["0.weight"], want["model"]["0.weight"])  # it stepped
        backward()
        opt.step()  # no copy outstanding: the kept hook does not wait
        assert len(waits) == 1
        step, got = _restored(mgr, 1)
    assert step == 1
    _assert_equal(got, want)


def test_unguarded_change_refuses_the_save_and_commits_nothing_torn(mod_daemon: Daemon) -> None:
    _, opt, state, backward = adamw_trainer(2, WIDTH)
    with CheckpointManager("overlap-refuse", rank=0, world_size=1, addr=mod_daemon.addr, on_error="raise") as mgr:
        want = _snapshot(state())
        handle = mgr.save(1, state(), overlap=True)
        assert handle.wait_copied(timeout_s=60)  # hand-written loop: wait, then change the state
        backward()
        opt.step()
        handle.wait(Level.STAGED, timeout_s=60)

        backward()
        handle = mgr.save(2, state(), overlap=True)
        opt.step()  # no guard, no wait: the AdamW step changes the state under the copy
        with pytest.raises(StateChangedDuringCopy, match="changed during the overlapped copy"):
            handle.wait(Level.STAGED, timeout_s=60)
        assert not handle.ok
        assert mgr.all_steps() == [1]
        step, got = _restored(mgr, 2)
    assert step == 1
    _assert_equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the device-to-host path needs one")
def test_cuda_state_overlapped_save_is_pinned_and_exact(mod_daemon: Daemon) -> None:
    _, opt, state, backward = adamw_trainer(3, WIDTH, "cuda")
    with CheckpointManager("overlap-cuda", rank=0, world_size=1, addr=mod_daemon.addr, on_error="raise") as mgr:
        backward()
        want = _snapshot(state())
        handle = mgr.save(1, state(), overlap=True, optimizers=(opt,))
        opt.step()  # queued on the default stream only after the guard saw the copy done
        handle.wait(Level.STAGED, timeout_s=60)
        assert mgr._saver.pinned.pinned_bytes > 0
        step, got = _restored(mgr, 3, "cuda")
    assert step == 1
    _assert_equal(got, want)
