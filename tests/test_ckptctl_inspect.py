"""ckptctl ``version``, ``ls``, ``show`` and ``status`` driven as a subprocess: against a running
daemon and against a bare disk root.

Protects the JSON schemas of ``ls``/``show``/``status`` (checked by the small schema matcher in
tests/_ckptctl_kit.py, the same shapes docs/cli.md documents): a daemon (by ``--addr`` or
``CKPTD_ADDR``) reports both saved steps committed with their tensors' dtypes and shapes and each
shard's memory and disk locations; a bare root (a daemon root or its data/ directory) reports the
same steps and tensors from disk only, and an uncommitted step directory as such; the human tables
carry the documented columns and no colour when piped. ``version`` works without a daemon.
"""

from __future__ import annotations

from tests._ckptctl_kit import (
    JOB,
    LS_SCHEMA,
    SHOW_SCHEMA,
    STATUS_SCHEMA,
    STEPS,
    WORLD,
    Nullable,
    Saved,
    conforms,
    ctl,
    ctl_json,
)


# -- inspecting ----------------------------------------------------------------------------
def test_version(saved: Saved) -> None:
    doc = ctl_json("version", *saved.addr())
    conforms(doc, {"schema": {"ckptctl.version/v1"}, "client": str, "python": str,
                   "daemon": Nullable({"version": str, "address": str})})
    assert doc["daemon"]["address"] == f"unix:{saved.daemon.addr}"
    assert ctl("--version").stdout.startswith("ckptctl ")
    # no daemon is not an error for `version`
    res = ctl("version", "--addr", "/nonexistent/ckptd.sock")
    assert res.returncode == 0 and "daemon  -" in res.stdout


def test_ls_show_status_json_against_daemon(saved: Saved) -> None:
    env = {"CKPTD_ADDR": saved.daemon.addr}  # the environment variable, not --addr
    ls = ctl_json("ls", env=env)
    conforms(ls, LS_SCHEMA)
    assert ls["jobs"] == [JOB]
    assert [s["step"] for s in ls["steps"]] == list(STEPS)
    for s in ls["steps"]:
        assert s["committed"] and s["world_size"] == WORLD
        assert s["tiers"]["disk"] == "committed"
    assert ls == ctl_json("ls", JOB, *saved.addr()) | {"source": ls["source"]}

    show = ctl_json("show", f"{JOB}@latest", "--tensors", *saved.addr())
    conforms(show, SHOW_SCHEMA)
    assert show["step"] == STEPS[-1] and show["world_size"] == WORLD
    assert set(show["tiers"]) == {"memory", "disk"}
    for shard in show["shards"]:
        exp = saved.expected[(show["step"], shard["rank"])]
        got = {t["name"]: t for t in shard["tensors"]}
        assert set(got) == set(exp)
        for name, t in exp.items():
            assert got[name]["dtype"] == str(t.dtype).removeprefix("torch.")
            assert got[name]["shape"] == list(t.shape)
        assert [loc["tier"] for loc in shard["locations"]] == ["memory", "disk"]
        assert shard["locations"][1]["location"] == str(saved.shard(show["step"], shard["rank"]))
        assert shard["chunks"] == len(shard["chunk_crc32c"]) >= 1
    show10 = ctl_json("show", f"{JOB}@10", *saved.addr())
    conforms(show10, SHOW_SCHEMA)
    assert show10["step"] == 10 and all("tensors" not in s for s in show10["shards"])
    assert ctl_json("show", JOB, *saved.addr())["step"] == STEPS[-1]  # bare JOB = latest

    status = ctl_json("status", *saved.addr())
    conforms(status, STATUS_SCHEMA)
    assert status["daemon"]["root"] == str(saved.daemon.root)
    assert status["jobs"][0]["latest"] == {"memory": 20, "disk": 20}
    assert status["disk"]["checkpoint_bytes"] == sum(s["nbytes"] for s in ls["steps"])


def test_json_against_bare_root(saved: Saved) -> None:
    daemon_ls = ctl_json("ls", *saved.addr())
    daemon_show = ctl_json("show", f"{JOB}@20", "--tensors", *saved.addr())
    assert saved.daemon.terminate() == 0
    for root in (saved.daemon.root, saved.data):  # a daemon root or its data/ directory
        ls = ctl_json("ls", "--root", str(root))
        conforms(ls, LS_SCHEMA)
        assert ls["source"] == {"kind": "disk", "root": str(saved.data)}
        assert [(s["step"], s["nbytes"], s["tiers"]) for s in ls["steps"]] == \
            [(s["step"], s["nbytes"], {"disk": "committed"}) for s in daemon_ls["steps"]]
    show = ctl_json("--root", str(saved.daemon.root), "show", f"{JOB}@20", "--tensors")
    conforms(show, SHOW_SCHEMA)
    assert show["tiers"] == ["disk"]
    for a, b in zip(show["shards"], daemon_show["shards"], strict=True):
        assert a["tensors"] == b["tensors"] and a["chunk_crc32c"] == b["chunk_crc32c"]
        assert a["locations"] == [{"tier": "disk", "location": str(saved.shard(20, a["rank"]))}]
    status = ctl_json("status", "--root", str(saved.data))
    conforms(status, STATUS_SCHEMA)
    assert status["daemon"] is None and status["jobs"][0]["latest"] == {"disk": 20}
    # an uncommitted step directory shows up as such
    (saved.data / JOB / "step-000000000030").mkdir()
    ls = ctl_json("ls", JOB, "--root", str(saved.data))
    conforms(ls, LS_SCHEMA)
    assert ls["steps"][-1] == {"job": JOB, "step": 30, "world_size": 0, "nbytes": 0, "committed": False,
                               "tiers": {"disk": "uncommitted"}, "pinned": False}


def test_human_tables(saved: Saved) -> None:
    ls = ctl("ls", *saved.addr())
    assert ls.returncode == 0
    header, *rows = ls.stdout.splitlines()
    assert header.split() == ["JOB", "STEP", "WORLD", "SIZE", "MEMORY", "DISK", "COMMITTED"]
    assert [r.split()[:2] for r in rows] == [[JOB, "10"], [JOB, "20"]]
    show = ctl("show", f"{JOB}@20", "--tensors", *saved.addr())
    assert show.returncode == 0
    assert "model.embed.weight" in show.stdout and "bfloat16" in show.stdout and "[96,40]" in show.stdout
    assert str(saved.shard(20, 1)) in show.stdout
    status = ctl("status", *saved.addr())
    assert status.returncode == 0 and JOB in status.stdout and "memory" in status.stdout
    assert "\x1b[" not in ls.stdout + show.stdout + status.stdout
