"""One rank of a DCP / DTensor job (gloo on CPU), run as its own process by tests/integration/test_dcp.py.

    python tests/_dcp_worker.py PHASE --addr SOCK --job J --rank R --world-size W --port P --out DIR

Phases (several cases per launch: a torch process costs seconds to start):
- ``save2``  (2 ranks): FSDP2 model + AdamW through get_state_dict; step 1 by ``dcp.save``, step 2
  by ``dcp.async_save`` (thread), step 3 by ``dcp.async_save`` (process); a DDP-style replicated
  state (job J-rep); ``CheckpointManager.save`` of a DTensor state (job J-mgr); the digests of every
  saved global tensor go to DIR/expected-<step>.json.
- ``load4``  (4 ranks): step 3 onto a 4-rank FSDP2 mesh (2→4), digests compared; a save by 4 ranks
  refused without the opt-in; training continues one step and saves step 4 with the opt-in;
  a 2-D (2×2) tensor-parallel DTensor state saved (job J-tp); strict errors; bad input.
- ``load2``  (2 ranks): step 4 (saved by 4) onto 2 ranks (4→2); the 2-D state onto a 1×2 mesh.
- ``export2`` (2 ranks): one FSDP2 step by ``dcp.save`` (plus a column-sharded DTensor in the model's
  dict: a tiling that is not a row range) for ``ckptctl export``; rank 0 writes every full model
  tensor to DIR/expected-export.safetensors (a 64 KiB row-sharded tensor makes the model larger
  than the test's memory limit).
- ``load1``  (1 rank): step 3 (saved by 2) onto 1 rank (2→1); J-mgr through the manager.
The last line is one JSON object: {"rank", "checks": [names passed], "errors": [...], ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # _example_util: shared with fsdp2_dcp.py

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from _example_util import state_digests  # noqa: E402
from ckptd_client import CheckpointManager, FailedPrecondition, Level, StateMismatchError  # noqa: E402
from ckptd_client.dcp import CkptdStorageReader, CkptdStorageWriter  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor  # noqa: E402


def model_and_optim(seed: int, mesh: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    # 6 and 10 rows: uneven shards on 4 ranks
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 10))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, i: int) -> float:
    g = torch.Generator().manual_seed(100 + i)
    x, y = torch.randn(4, 8, generator=g), torch.randn(4, 10, generator=g)
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return float(loss)


def fsdp_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


class Worker:
    def __init__(self, ns: argparse.Namespace) -> None:
        self.ns = ns
        self.rank, self.world = ns.rank, ns.world_size
        self.out = Path(ns.out)
        self.checks: list[str] = []
        self.report: dict[str, Any] = {"rank": self.rank}

    def manager(self, job: str, **kw: Any) -> CheckpointManager:
        return CheckpointManager(job, rank=self.rank, world_size=self.world, addr=self.ns.addr,
                                 on_error="raise", **kw)

    def expect(self, name: str, ok: bool, detail: str = "") -> None:
        if not ok:
            raise AssertionError(f"{name}: {detail}")
        self.checks.append(name)

    def same_as_saved(self, name: str, state: Any, step: int) -> None:
        want = json.loads((self.out / f"expected-{step}.json").read_text())
        got = state_digests(state)
        diff = sorted(k for k in want if got.get(k) != want[k]) + sorted(set(got) - set(want))
        self.expect(name, not diff, f"differ: {diff[:5]}")

    # -- phases -----------------------------------------------------------------------------------
    def save2(self) -> None:
        job = self.ns.job
        mesh = init_device_mesh("cpu", (self.world,))
        model, opt = model_and_optim(0, mesh)
        m = self.manager(job)
        kinds = {1: None, 2: AsyncCheckpointerType.THREAD, 3: AsyncCheckpointerType.PROCESS}
        for step, kind in kinds.items():
            train_step(model, opt, step)
            state = fsdp_state(model, opt)
            want = state_digests(state)
            writer = CkptdStorageWriter(manager=m, step=step)
            if kind is None:
                dcp.save(state, storage_writer=writer)
            else:
                dcp.async_save(state, storage_writer=writer, async_checkpointer_type=kind).result()
            if self.rank == 0:
                (self.out / f"expected-{step}.json").write_text(json.dumps(want))
        m.wait_until_finished(Level.LOCAL_DURABLE, timeout_s=60)
        self.expect("fsdp2-saved-sync-thread-process", m.all_steps() == [1, 2, 3], str(m.all_steps()))

        # DDP-style replicated state: the same tensors on both ranks, stored once
        rep = {"w": torch.arange(4096, dtype=torch.float32), "b": torch.ones(1024, dtype=torch.float64)}
        with self.manager(f"{job}-rep") as mr:
            dcp.save(rep, storage_writer=CkptdStorageWriter(manager=mr, step=1))
            # async: staged whole into each rank's slot, the other rank's copy packed away
            dcp.async_save(rep, storage_writer=CkptdStorageWriter(manager=mr, step=2)).result()
            mr.wait_until_finished(Level.LOCAL_DURABLE, timeout_s=60)
        self.checks.append("replicated-saved")

        # CheckpointManager.save of a DTensor state goes through the DCP planner
        w = distribute_tensor(torch.arange(24, dtype=torch.float32).reshape(6, 4), mesh, [Shard(0)])
        with self.manager(f"{job}-mgr") as mm:
            h = mm.save(1, {"w": w, "note": torch.tensor([7])})
            h.wait(Level.LOCAL_DURABLE, timeout_s=60)
        self.expect("manager-dtensor-save", h.ok)

    def load4(self) -> None:
        job = self.ns.job
        mesh = init_device_mesh("cpu", (self.world,))
        model, opt = model_and_optim(5, mesh)  # another init: the load must overwrite it
        state = fsdp_state(model, opt)
        w0 = model[0].weight
        reader = CkptdStorageReader(job, addr=self.ns.addr)
        dcp.load(state, storage_reader=reader)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.expect("resumed-latest", reader.loaded_step == 3, str(reader.loaded_step))
        self.same_as_saved("reshard-2-to-4", fsdp_state(model, opt), 3)
        self.expect("param-identity-kept", model[0].weight is w0)
        self.report["bytes_read"] = {str(k): v for k, v in reader.bytes_read.items()}

        m = self.manager(job)
        try:
            m.save(4, {"x": torch.zeros(1)})
            refused = False
        except FailedPrecondition as exc:
            refused = "world_size 2" in str(exc)
        self.expect("new-world-size-refused-without-opt-in", refused)
        m.close()
        loss = train_step(model, opt, 4)
        self.expect("training-continues", loss == loss and loss < 1e6, str(loss))
        with self.manager(job, allow_new_world_size=True) as m4:
            state = fsdp_state(model, opt)
            want = state_digests(state)
            dcp.save(state, storage_writer=CkptdStorageWriter(manager=m4, step=4))
            m4.wait_until_finished(Level.LOCAL_DURABLE, timeout_s=60)
        if self.rank == 0:
            (self.out / "expected-4.json").write_text(json.dumps(want))
        self.checks.append("saved-by-4-with-opt-in")

        # tensor parallel on a 2-D mesh: rows sharded over "tp", replicated over "dp"
        mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        full = torch.arange(48, dtype=torch.float32).reshape(8, 6)
        tp = {"attn": distribute_tensor(full, mesh2, [Replicate(), Shard(0)]),
              "mlp": distribute_tensor(full.t().contiguous() * 2, mesh2, [Shard(1), Shard(0)])}
        want_tp = state_digests(tp)
        with self.manager(f"{job}-tp") as mt:
            dcp.save(tp, storage_writer=CkptdStorageWriter(manager=mt, step=1))
            mt.wait_until_finished(Level.LOCAL_DURABLE, timeout_s=60)
        if self.rank == 0:
            (self.out / "expected-tp.json").write_text(json.dumps(want_tp))
        self.checks.append("tp-2d-saved")
        self.strict_and_bad_input(mesh)

    def strict_and_bad_input(self, mesh: Any) -> None:
        """Strict errors and a plan naming a tensor the checkpoint lacks; then a good load still works."""
        job = f"{self.ns.job}-tp"
        mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        zeros = torch.zeros(8, 6)
        extra = {"attn": distribute_tensor(zeros, mesh2, [Replicate(), Shard(0)]),
                 "mlp": distribute_tensor(zeros.t().contiguous(), mesh2, [Shard(1), Shard(0)]),
                 "not_saved": distribute_tensor(zeros, mesh2, [Replicate(), Shard(0)])}
        with self.manager(job) as mt:
            try:
                mt.restore(extra)
                named = ""
            except Exception as exc:  # noqa: BLE001 - the message is what is checked
                named = str(exc)
            self.expect("strict-missing-key-named", "not_saved" in named, named[:300])
            bad_dtype = {"attn": distribute_tensor(zeros.double(), mesh2, [Replicate(), Shard(0)]),
                         "mlp": distribute_tensor(zeros.t().contiguous(), mesh2, [Shard(1), Shard(0)])}
            try:
                mt.restore(bad_dtype)
                named = ""
            except StateMismatchError as exc:
                named = str(exc)
            self.expect("strict-dtype-named", "attn" in named, named[:300])
            good = {"attn": distribute_tensor(zeros, mesh2, [Replicate(), Shard(0)]),
                    "mlp": distribute_tensor(zeros.t().contiguous(), mesh2, [Shard(1), Shard(0)])}
            dt, ptr = good["attn"], good["attn"].to_local().data_ptr()
            self.expect("manager-dtensor-restore", mt.restore(good) == 1)
            self.expect("dtensor-identity-kept", good["attn"] is dt and dt.to_local().data_ptr() == ptr)
            want = json.loads((self.out / "expected-tp.json").read_text())
            self.expect("tp-2d-round-trip", state_digests(good) == want)

    def load2(self) -> None:
        job = self.ns.job
        mesh = init_device_mesh("cpu", (self.world,))
        model, opt = model_and_optim(9, mesh)
        state = fsdp_state(model, opt)
        reader = CkptdStorageReader(job, addr=self.ns.addr)
        dcp.load(state, storage_reader=reader)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.expect("latest-is-4", reader.loaded_step == 4, str(reader.loaded_step))
        self.same_as_saved("reshard-4-to-2", fsdp_state(model, opt), 4)
        self.report["bytes_read"] = {str(k): v for k, v in reader.bytes_read.items()}
        mesh2 = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "tp"))
        zeros = torch.zeros(8, 6)
        tp = {"attn": distribute_tensor(zeros, mesh2, [Replicate(), Shard(0)]),
              "mlp": distribute_tensor(zeros.t().contiguous(), mesh2, [Replicate(), Shard(1)])}
        dcp.load(tp, storage_reader=CkptdStorageReader(f"{job}-tp", addr=self.ns.addr))
        want = json.loads((self.out / "expected-tp.json").read_text())
        self.expect("tp-2d-reshard-4-to-2", state_digests(tp) == want)

    def export2(self) -> None:
        from safetensors.torch import save_file

        mesh = init_device_mesh("cpu", (self.world,))
        model, opt = model_and_optim(0, mesh)
        train_step(model, opt, 1)
        state = fsdp_state(model, opt)
        # 64 KiB sharded by rows (32 KiB a rank): larger than the export's memory limit in the test
        state["model"]["big"] = distribute_tensor(torch.randn(64, 256, generator=torch.Generator().manual_seed(3)),
                                                  mesh, [Shard(0)])
        state["model"]["cols"] = distribute_tensor(torch.arange(40, dtype=torch.float64).reshape(4, 10), mesh,
                                                   [Shard(1)])
        full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state["model"].items()}
        with self.manager(self.ns.job) as m:
            dcp.save(state, storage_writer=CkptdStorageWriter(manager=m, step=1))
            m.wait_until_finished(Level.LOCAL_DURABLE, timeout_s=60)
        if self.rank == 0:
            save_file({k: v.detach().contiguous() for k, v in full.items()},
                      str(self.out / "expected-export.safetensors"))
        self.checks.append("exported-state-saved")

    def load1(self) -> None:
        job = self.ns.job
        mesh = init_device_mesh("cpu", (1,))
        for step in (1, 3):
            model, opt = model_and_optim(11, mesh)
            state = fsdp_state(model, opt)
            dcp.load(state, storage_reader=CkptdStorageReader(job, step, addr=self.ns.addr))
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            self.same_as_saved(f"reshard-2-to-1-step{step}", fsdp_state(model, opt), step)
        w = distribute_tensor(torch.zeros(6, 4), mesh, [Shard(0)])
        got = {"w": w, "note": torch.tensor([0])}
        with self.manager(f"{job}-mgr") as mm:
            self.expect("manager-dtensor-2-to-1", mm.restore(got) == 1)
        self.expect("manager-dtensor-values", torch.equal(got["w"].full_tensor(), torch.arange(24.).reshape(6, 4))
                    and got["note"].item() == 7)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("phase", choices=["save2", "load4", "load2", "load1", "export2"])
    for a in ("--addr", "--job", "--out"):
        p.add_argument(a, required=True)
    for a in ("--rank", "--world-size", "--port"):
        p.add_argument(a, type=int, required=True)
    ns = p.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ns.port))
    dist.init_process_group("gloo", rank=ns.rank, world_size=ns.world_size)
    w = Worker(ns)
    errors: list[str] = []
    try:
        getattr(w, ns.phase)()
    except Exception:  # noqa: BLE001 - reported, the test fails on it
        errors.append(traceback.format_exc()[-3000:])
    w.report.update(checks=w.checks, errors=errors)
    print(json.dumps(w.report), flush=True)
    os._exit(1 if errors else 0)  # no teardown collectives: a failed rank must not hang its peers


if __name__ == "__main__":
    sys.exit(main())
