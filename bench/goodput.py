"""What does checkpointing every step cost a real training loop, beyond the save's stall?

Each method (``--methods``, default every one in ``_goodput_methods.METHODS``: none, ckptd_sync,
ckptd_overlap, dcp_async, dlrover) runs in a child process of its own, one after another, with
the same model (``_goodput_train``: an MLP whose parameters plus AdamW moments total at least ``--size-mib``,
fp32), the same seed, ``--threads`` torch compute threads, ``--warmup`` untimed steps and
``--steps`` timed ones, each a real forward, backward and AdamW step with a save every step.

Per method: ``wall_s`` (the timed steps), ``overhead`` (wall_s / none's wall_s - 1),
``blocked_ms_median`` / ``blocked_ms_p99`` (per step, the time inside the method's hooks: the
save call, for DCP the wait for its staging before the optimizer step, for ckptd_overlap the
guard's wait for the copy inside the optimizer step), ``durable_saves``
(timed steps that reached local disk: ckptd's from its daemon's LOCAL_DURABLE log lines, DCP's
completed uploads; DLRover's memory mode writes none), ``daemon_cpu_s`` (ckptd: the daemon's
CPU seconds over the whole child, warm-up saves included) and ``step_compute_s``. A method
that cannot run here (DLRover not importable) is reported with ``available: false`` and the
reason instead of figures. DLRover can live in another interpreter (``--dlrover-python``, or
``CKPTD_BENCH_DLROVER_PYTHON``), e.g. a separate venv that also sees this one's packages.

Output: a table, and with ``--json`` a last line holding one JSON object with ``state_bytes``,
``steps``, ``threads``, ``methods`` and the machine context.

    .venv/bin/python bench/goodput.py --json --threads 1
    .venv/bin/python bench/goodput.py --json --threads 2 --steps 25
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _goodput_methods import METHODS, Ctx
from _stall_daemon import SLOT_ALIGN, Daemon
from _stall_peers import DLROVER_SOCK_DIR, dlrover_cleanup
from _util import MIB, REPO, Cleanup, cleaned_up

SCRIPT = Path(__file__).resolve()


def log(msg: str) -> None:
    print(f"[goodput] {msg}", file=sys.stderr, flush=True)


def _pctl(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dlrover_python(args: argparse.Namespace) -> tuple[str, str | None]:
    """(interpreter, None) where DLRover imports, or (interpreter, why not)."""
    py = args.dlrover_python or os.environ.get("CKPTD_BENCH_DLROVER_PYTHON") or sys.executable
    probe = "import dlrover.trainer.torch.flash_checkpoint.ddp, torch"
    try:
        r = subprocess.run([py, "-c", probe], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return py, f"{py}: {exc}"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return py, f"DLRover is not importable by {py} ({last}); install the 'bench' extra, or name an " \
                   "interpreter that has it with --dlrover-python"
    return py, None


def run_method(name: str, args: argparse.Namespace, base: Path, cleanup: Cleanup) -> dict[str, Any]:
    spec = METHODS[name]
    py = sys.executable
    if spec.dlrover:
        py, why = dlrover_python(args)
        if why is not None:
            return {"available": False, "error": why}
    workdir = Path(tempfile.mkdtemp(prefix=f"goodput-{name}-", dir=base))
    cleanup.add(f"{name} work dir", lambda: shutil.rmtree(workdir, ignore_errors=True))
    # another interpreter (--dlrover-python) finds this checkout's ckptd and client too
    path = os.pathsep.join([str(REPO), str(REPO / "client"), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    daemon: Daemon | None = None
    if spec.daemon:
        slot = (args.size_mib * MIB + 16 * MIB) // SLOT_ALIGN * SLOT_ALIGN + SLOT_ALIGN
        sock_dir = Path(tempfile.mkdtemp(prefix="ckg-", dir="/tmp"))
        cleanup.add("socket dir", lambda: shutil.rmtree(sock_dir, ignore_errors=True))
        shm_dir = Path("/dev/shm") / f"ckptd-goodput-{uuid.uuid4().hex[:10]}"
        cleanup.add("ckptd shm dir", lambda: shutil.rmtree(shm_dir, ignore_errors=True))
        daemon = Daemon(workdir / "ckptd-root", shm_dir, sock_dir / "ckptd.sock", 2 * slot + 2 * SLOT_ALIGN,
                        workdir / "ckptd.log")
        cleanup.add("ckptd daemon", daemon.stop)
        daemon.start()
    if spec.dlrover:
        run_id = f"ckptdgoodput{uuid.uuid4().hex[:8]}"
        existed = DLROVER_SOCK_DIR.exists()
        cleanup.add("dlrover shm and sockets", lambda: dlrover_cleanup(run_id, existed))
        env["TORCHELASTIC_RUN_ID"] = run_id
    result = workdir / "result.json"
    cmd = [py, str(SCRIPT), "--child", name, "--result", str(result), "--dir", str(workdir),
           "--size-mib", str(args.size_mib), "--width", str(args.width), "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--seed", str(args.seed), "--socket", str(daemon.socket) if daemon else ""]
    cpu0 = _cpu_s(daemon.proc.pid) if daemon is not None and daemon.proc is not None else 0.0
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"available": True, "error": f"timed out after {args.child_timeout}s"}
    out: dict[str, Any] = json.loads(result.read_text()) if result.exists() else {
        "error": f"child exited with {proc.returncode}: {proc.stderr.strip()[-1500:]}"}
    out["available"] = True
    if daemon is not None and daemon.proc is not None:
        out["daemon_cpu_s"] = round(_cpu_s(daemon.proc.pid) - cpu0, 3)
        durable = [s for s in daemon.drain_seconds() if s > args.warmup]
        out["durable_saves"] = len(durable)
        daemon.stop()
    return out


def child(args: argparse.Namespace) -> int:
    import torch
    from _goodput_train import build, train

    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {}
    try:
        t = build(args.size_mib * MIB, args.width, args.batch, args.seed)
        out.update(state_bytes=t.state_bytes, tensors=t.n_tensors)
        method = METHODS[args.child].cls(Ctx(Path(args.dir), args.socket, args.warmup), t)
        try:
            timing = train(t, method, args.steps, args.warmup)
            durable = [s for s in method.finish() if s > args.warmup]
        finally:
            method.close()
        blocked = timing.blocked_s
        out.update(wall_s=round(timing.wall_s, 4), durable_saves=len(durable),
                   blocked_ms_median=round(1000 * (_pctl(blocked, 0.5) or 0.0), 3),
                   blocked_ms_p99=round(1000 * (_pctl(blocked, 0.99) or 0.0), 3),
                   blocked_ms_all=[round(1000 * b, 3) for b in blocked],
                   skipped=getattr(method, "skipped", 0))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        import traceback

        traceback.print_exc()
        out["error"] = f"{type(exc).__name__}: {exc}"
    Path(args.result).write_text(json.dumps(out))
    return 0


def table(res: dict[str, Any]) -> str:
    lines = [f"ckptd bench/goodput: {res['state_bytes'] / MIB:.0f} MiB state, {res['steps']} steps, "
             f"{res['threads']} thread(s); load {res['machine']['loadavg_start'][0]:.2f} -> "
             f"{res['machine']['loadavg_end'][0]:.2f}",
             f"{'method':<12} {'wall s':>8} {'overhead':>9} {'blocked ms p50':>15} {'p99':>8} {'durable':>8}"]
    for name, m in res["methods"].items():
        if "wall_s" not in m:
            lines.append(f"{name:<12} {'-':>8}  ({m.get('error', 'not run')})")
            continue
        ov = f"{100 * m['overhead']:+.1f}%" if m.get("overhead") is not None else "-"
        lines.append(f"{name:<12} {m['wall_s']:>8.2f} {ov:>9} {m['blocked_ms_median']:>15.1f} "
                     f"{m['blocked_ms_p99']:>8.1f} {m['durable_saves']:>8}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--size-mib", type=int, default=512, help="model + AdamW state, at least (default 512)")
    p.add_argument("--width", type=int, default=2048, help="MLP width (default 2048)")
    p.add_argument("--batch", type=int, default=64, help="rows per step (default 64)")
    p.add_argument("--steps", type=int, default=25, help="timed steps (default 25)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first, saving too (default 2)")
    p.add_argument("--threads", type=int, choices=(1, 2), default=1, help="torch compute threads")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", help="where checkpoints are written (default: the system temp dir)")
    p.add_argument("--dlrover-python", help="an interpreter that can import dlrover and torch")
    p.add_argument("--child-timeout", type=float, default=1800)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--child", choices=tuple(METHODS), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--socket", default="", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    names = [m for m in ns.methods.split(",") if m]
    unknown = set(names) - set(METHODS)
    if unknown:
        p.error(f"unknown methods: {', '.join(sorted(unknown))}")
    if "none" not in names:
        names.insert(0, "none")  # the overhead is against it
    ns.method_list = names
    if ns.steps < 1 or ns.warmup < 0 or ns.size_mib < 1 or ns.width < 8 or ns.batch < 1:
        p.error("need --steps >= 1, --warmup >= 0, --size-mib >= 1, --width >= 8, --batch >= 1")
    return ns


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    base = Path(args.dir) if args.dir else Path(tempfile.gettempdir())
    res: dict[str, Any] = {"bench": "goodput", "state_bytes": 0, "steps": args.steps, "threads": args.threads,
                           "warmup": args.warmup, "width": args.width, "batch": args.batch, "methods": {},
                           "machine": {"cpu_count": os.cpu_count(), "loadavg_start": list(os.getloadavg())}}
    with cleaned_up() as cleanup:
        for name in args.method_list:
            log(f"{name}: {args.warmup} + {args.steps} steps")
            t0 = time.perf_counter()
            m = run_method(name, args, base, cleanup)
            m["run_s"] = round(time.perf_counter() - t0, 2)
            res["methods"][name] = m
            res["state_bytes"] = res["state_bytes"] or m.get("state_bytes", 0)
            res["tensors"] = res.get("tensors") or m.get("tensors")
    base_wall = res["methods"].get("none", {}).get("wall_s")
    for m in res["methods"].values():
        m["overhead"] = round(m["wall_s"] / base_wall - 1, 4) if base_wall and "wall_s" in m else None
        m.pop("state_bytes", None)
        m.pop("tensors", None)
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    print(table(res), flush=True)
    if args.json:
        print(json.dumps(res, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
