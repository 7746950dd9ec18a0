"""ckptd configuration: TOML file < CKPTD_* env < flags, and every validation error names its key."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckptd.core.config import MAX_SOCKET_PATH, Config, env_overrides, load, parse_bytes, sizes
from ckptd.core.errors import InvalidArgument
from tests._ckptd_helpers import clean_env


def write(tmp_path: Path, text: str, name: str = "ckptd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- precedence ----------------------------------------------------------------------------


def test_defaults_when_nothing_is_given() -> None:
    cfg = load(None, env={})
    assert cfg == Config()
    assert cfg.memory.slots_per_rank >= 2
    assert cfg.socket_path == cfg.daemon.root / "run" / "ckptd.sock"


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, """
[daemon]
root = "/tmp/ckptd-file-root"
log_level = "DEBUG"
[memory]
budget_bytes = "1GiB"
backpressure = "skip"
wait_timeout_s = 5
[disk]
max_to_keep = 7
enabled = true
""")
    from_file = load(path, env={})
    assert from_file.daemon.root == Path("/tmp/ckptd-file-root")
    assert from_file.daemon.log_level == "DEBUG"
    assert from_file.memory.budget_bytes == 2**30
    assert from_file.memory.backpressure == "skip"
    assert from_file.memory.wait_timeout_s == 5.0
    assert isinstance(from_file.memory.wait_timeout_s, float)
    assert from_file.disk.max_to_keep == 7

    env = {
        "CKPTD_MEMORY_BUDGET_BYTES": "2GiB",
        "CKPTD_DISK_MAX_TO_KEEP": "4",
        "CKPTD_DISK_ENABLED": "off",
        "CKPTD_DAEMON_SOCKET": "/tmp/ckptd-env.sock",
        "CKPTD_ADDR": "unix:/elsewhere",  # a client variable: not a config section, ignored
        "UNRELATED": "x",
    }
    from_env = load(path, env=env)
    assert from_env.memory.budget_bytes == 2 * 2**30  # env beats file
    assert from_env.disk.max_to_keep == 4
    assert from_env.disk.enabled is False
    assert from_env.socket_path == Path("/tmp/ckptd-env.sock")
    assert from_env.memory.backpressure == "skip"  # untouched keys keep the file's value
    assert from_env.daemon.log_level == "DEBUG"

    flags = {"memory": {"budget_bytes": "3GiB"}, "disk": {"max_to_keep": 9}}
    from_flags = load(path, env=env, flags=flags)
    assert from_flags.memory.budget_bytes == 3 * 2**30  # flag beats env and file
    assert from_flags.disk.max_to_keep == 9
    assert from_flags.disk.enabled is False  # env still beats the file where no flag is given


def test_env_overrides_parse_section_and_key() -> None:
    env = {"CKPTD_MEMORY_SLOTS_PER_RANK": "3", "CKPTD_DAEMON_IO_THREADS": "8", "CKPTD_FAILPOINTS": "x"}
    assert env_overrides(env) == {"memory": {"slots_per_rank": "3"}, "daemon": {"io_threads": "8"}}
    cfg = load(None, env=env)
    assert cfg.memory.slots_per_rank == 3
    assert cfg.daemon.io_threads == 8


@pytest.mark.parametrize("raw,expected", [("1", True), ("true", True), ("YES", True), ("on", True),
                                          ("0", False), ("false", False), ("No", False), ("off", False)])
def test_env_booleans(raw: str, expected: bool) -> None:
    assert load(None, env={"CKPTD_DISK_DIRECT_IO": raw}).disk.direct_io is expected


def test_default_paths_follow_root(tmp_path: Path) -> None:
    cfg = load(None, env={}, flags={"daemon": {"root": str(tmp_path / "r")}})
    assert cfg.socket_path == tmp_path / "r" / "run" / "ckptd.sock"
    assert cfg.shm_path.parent == Path("/dev/shm")
    other = load(None, env={}, flags={"daemon": {"root": str(tmp_path / "other")}})
    assert other.shm_path != cfg.shm_path  # one private shm directory per root


# -- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("raw,expected", [
    (0, 0), (4096, 4096), ("4096", 4096), ("512MiB", 512 * 2**20), ("8GiB", 8 * 2**30),
    ("1.5GiB", 3 * 2**29), ("2kb", 2000), ("3 MB", 3 * 10**6), (" 1TiB ", 2**40), ("7b", 7),
    ("16kib", 16 * 1024),
])
def test_parse_bytes_accepts(raw: object, expected: int) -> None:
    assert parse_bytes(raw, "memory.budget_bytes") == expected


@pytest.mark.parametrize("raw", ["12XB", "", "MiB", "-5MiB", "1e3", "1,024", "0x10", "ten", "5 Mi B"])
def test_parse_bytes_rejects_text(raw: str) -> None:
    with pytest.raises(InvalidArgument, match=r"memory\.chunk_bytes: cannot parse size"):
        parse_bytes(raw, "memory.chunk_bytes")


@pytest.mark.parametrize("raw,why", [(-1, "negative"), (True, "bool"), (1.5, "float"), (None, "NoneType"),
                                     ([1], "list")])
def test_parse_bytes_rejects_values(raw: object, why: str) -> None:
    with pytest.raises(InvalidArgument, match=rf"disk\.write_block_bytes: .*{why}"):
        parse_bytes(raw, "disk.write_block_bytes")


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(sorted(sizes._UNITS)))
def test_parse_bytes_units(n: int, unit: str) -> None:
    expected = n * sizes._UNITS[unit]
    assert parse_bytes(f"{n}{unit}", "k") == expected
    assert parse_bytes(f"{n} {unit.upper()}", "k") == expected


# -- validation: every error is InvalidArgument and names the key ----------------------------


BAD_FILES = [
    ("[bogus]\nx = 1\n", r"\[bogus\]"),
    ("[memory]\nbogus = 1\n", r"memory\.bogus"),
    ("[memory]\nbudget_bytes = \"12XB\"\n", r"memory\.budget_bytes"),
    ("[memory]\nbudget_bytes = -1\n", r"memory\.budget_bytes.*negative"),
    ("[memory]\nbudget_bytes = 0\n", r"memory\.budget_bytes must be positive"),
    ("[memory]\nslots_per_rank = 1\n", r"memory\.slots_per_rank"),
    ("[memory]\nslots_per_rank = \"2\"\n", r"memory\.slots_per_rank.*integer"),
    ("[memory]\nslots_per_rank = true\n", r"memory\.slots_per_rank.*integer"),
    ("[memory]\nbackpressure = \"drop\"\n", r"memory\.backpressure"),
    ("[memory]\nbackpressure = 1\n", r"memory\.backpressure"),
    ("[memory]\nchunk_bytes = 1000\n", r"memory\.chunk_bytes"),
    ("[memory]\nchunk_bytes = \"2GiB\"\n", r"memory\.chunk_bytes"),
    ("[memory]\nwait_timeout_s = -1\n", r"memory\.wait_timeout_s"),
    ("[memory]\nwait_timeout_s = nan\n", r"memory\.wait_timeout_s"),
    ("[memory]\nlease_timeout_s = inf\n", r"memory\.lease_timeout_s"),
    ("[memory]\nlease_timeout_s = \"soon\"\n", r"memory\.lease_timeout_s.*number"),
    ("[daemon]\nshutdown_timeout_s = 100000\n", r"daemon\.shutdown_timeout_s"),
    ("[daemon]\nio_threads = 0\n", r"daemon\.io_threads"),
    ("[daemon]\nlog_level = \"LOUD\"\n", r"daemon\.log_level"),
    ("[daemon]\nnice = 20\n", r"daemon\.nice"),
    ("[daemon]\nnice = -1\n", r"daemon\.nice"),
    ("[daemon]\ncpu_affinity = \"0-x\"\n", r"daemon\.cpu_affinity"),
    ("[daemon]\ncpu_affinity = \"3-1\"\n", r"daemon\.cpu_affinity"),
    ("[daemon]\nroot = \"\"\n", r"daemon\.root"),
    ("[daemon]\nroot = 5\n", r"daemon\.root"),
    ("[daemon]\nsocket = \"/tmp/" + "s" * 200 + ".sock\"\n", r"daemon\.socket"),
    ("[daemon]\nroot = \"/tmp/" + "r" * 200 + "\"\n", r"daemon\.socket"),
    ("[disk]\nmax_to_keep = 0\n", r"disk\.max_to_keep"),
    ("[disk]\nkeep_period = -1\n", r"disk\.keep_period"),
    ("[disk]\nevery_n_steps = 0\n", r"disk\.every_n_steps"),
    ("[disk]\nenabled = \"yes\"\n", r"disk\.enabled.*true or false"),
    ("[disk]\nwrite_block_bytes = 4097\n", r"disk\.write_block_bytes"),
    ("memory = 3\n", r"\[memory\] must be a table"),
    ("[memory\nbudget_bytes = 1\n", r"not valid TOML"),
    ("[memory]\nbudget_bytes = \n", r"not valid TOML"),
    ("[memory]\nbudget_bytes = 1\nbudget_bytes = 2\n", r"not valid TOML"),
]


@pytest.mark.parametrize("text,pattern", BAD_FILES, ids=[f"bad{i}" for i in range(len(BAD_FILES))])
def test_bad_file_values_name_the_key(tmp_path: Path, text: str, pattern: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InvalidArgument, match=pattern) as info:
        load(path, env={})
    assert isinstance(info.value, ValueError)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[memory]\nslots_per_rank = \"x\"\n")
    with pytest.raises(InvalidArgument, match=rf"memory\.slots_per_rank \(file {path}\)"):
        load(path, env={})
    with pytest.raises(InvalidArgument, match="does not exist"):
        load(tmp_path / "missing.toml", env={})
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InvalidArgument, match="not valid TOML"):
        load(binary, env={})


@pytest.mark.parametrize("env,pattern", [
    ({"CKPTD_MEMORY_BOGUS": "1"}, r"memory\.bogus \(env\)"),
    ({"CKPTD_MEMORY_BUDGET_BYTES": "12XB"}, r"memory\.budget_bytes \(env\)"),
    ({"CKPTD_MEMORY_SLOTS_PER_RANK": "1"}, r"memory\.slots_per_rank"),
    ({"CKPTD_MEMORY_SLOTS_PER_RANK": "two"}, r"memory\.slots_per_rank \(env\).*integer"),
    ({"CKPTD_MEMORY_BACKPRESSURE": "panic"}, r"memory\.backpressure"),
    ({"CKPTD_MEMORY_WAIT_TIMEOUT_S": "-3"}, r"memory\.wait_timeout_s"),
    ({"CKPTD_DISK_ENABLED": "maybe"}, r"disk\.enabled \(env\)"),
    ({"CKPTD_DAEMON_SOCKET": "/tmp/" + "x" * MAX_SOCKET_PATH}, r"daemon\.socket"),
])
def test_bad_env_values_name_the_key(env: dict[str, str], pattern: str) -> None:
    with pytest.raises(InvalidArgument, match=pattern):
        load(None, env=env)


def test_bad_flag_names_the_key_and_beats_a_good_env() -> None:
    with pytest.raises(InvalidArgument, match=r"memory\.budget_bytes \(flag\)"):
        load(None, env={"CKPTD_MEMORY_BUDGET_BYTES": "1GiB"}, flags={"memory": {"budget_bytes": "12XB"}})
    # every source is checked as it is applied: a good flag does not hide a bad env value
    with pytest.raises(InvalidArgument, match=r"memory\.budget_bytes \(env\)"):
        load(None, env={"CKPTD_MEMORY_BUDGET_BYTES": "12XB"}, flags={"memory": {"budget_bytes": "1GiB"}})


def test_socket_path_limit_is_exact() -> None:
    ok = "/tmp/" + "a" * (MAX_SOCKET_PATH - len("/tmp/"))
    assert len(ok) == MAX_SOCKET_PATH
    assert str(load(None, env={"CKPTD_DAEMON_SOCKET": ok}).socket_path) == ok
    with pytest.raises(InvalidArgument, match="Unix socket limit"):
        load(None, env={"CKPTD_DAEMON_SOCKET": ok + "a"})


def test_accepted_edge_values() -> None:
    cfg = load(None, env={}, flags={
        "memory": {"slots_per_rank": 2, "chunk_bytes": 4096, "wait_timeout_s": 0, "backpressure": "skip"},
        "disk": {"max_to_keep": 1, "keep_period": 0, "write_block_bytes": "1GiB"},
        "daemon": {"io_threads": 256, "log_level": "warning"},
    })
    assert cfg.memory.chunk_bytes == 4096
    assert cfg.memory.wait_timeout_s == 0.0 and not math.isnan(cfg.memory.wait_timeout_s)
    assert cfg.disk.write_block_bytes == 2**30
    assert cfg.daemon.io_threads == 256


# -- the command line ------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptd.daemon.cli", *args], capture_output=True, text=True,
                          timeout=60, env=clean_env(env))


def test_serve_with_bad_config_exits_2(tmp_path: Path) -> None:
    bad = write(tmp_path, "[memory]\nslots_per_rank = 1\n", "bad.toml")
    res = run_cli("serve", "--config", str(bad), "--root", str(tmp_path / "root"),
                  "--socket", str(tmp_path / "s.sock"))
    assert res.returncode == 2, res
    assert "config error" in res.stderr
    assert "memory.slots_per_rank" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "root" / "ckptd.lock").exists()  # nothing started


@pytest.mark.parametrize("text,key", [
    ("[memory\n", "not valid TOML"),
    ("[disk]\nmax_to_keep = 0\n", "disk.max_to_keep"),
    ("[nope]\n", "[nope]"),
])
def test_serve_bad_toml_variants_exit_2(tmp_path: Path, text: str, key: str) -> None:
    bad = write(tmp_path, text, "bad.toml")
    res = run_cli("serve", "--config", str(bad))
    assert res.returncode == 2
    assert key in res.stderr and "Traceback" not in res.stderr


def test_serve_bad_flag_and_env_exit_2(tmp_path: Path) -> None:
    res = run_cli("serve", "--root", str(tmp_path), "--budget-bytes", "12XB")
    assert res.returncode == 2 and "memory.budget_bytes (flag)" in res.stderr
    res = run_cli("serve", "--root", str(tmp_path), env={"CKPTD_MEMORY_BACKPRESSURE": "drop"})
    assert res.returncode == 2 and "memory.backpressure" in res.stderr


def test_check_prints_merged_config(tmp_path: Path) -> None:
    cfg = write(tmp_path, "[memory]\nbudget_bytes = \"1GiB\"\nslots_per_rank = 3\n[disk]\nmax_to_keep = 5\n")
    res = run_cli("serve", "--check", "--config", str(cfg), "--root", str(tmp_path / "r"),
                  "--budget-bytes", "64MiB", env={"CKPTD_DISK_MAX_TO_KEEP": "6"})
    assert res.returncode == 0, res.stderr
    shown = tomllib.loads(res.stdout)
    assert shown["memory"]["budget_bytes"] == 64 * 2**20  # flag
    assert shown["disk"]["max_to_keep"] == 6  # env over file
    assert shown["memory"]["slots_per_rank"] == 3  # file
    assert shown["daemon"]["root"] == str(tmp_path / "r")


def test_check_prints_the_resolved_socket_and_shm_dir_as_toml_that_loads_back(tmp_path: Path) -> None:
    root = tmp_path / "r"
    res = run_cli("serve", "--check", "--root", str(root))
    assert res.returncode == 0, res.stderr
    assert "None" not in res.stdout and "Config(" not in res.stdout
    shown = tomllib.loads(res.stdout)
    resolved = load(env={}, flags={"daemon": {"root": str(root)}})
    assert shown["daemon"]["socket"] == str(root / "run" / "ckptd.sock")
    assert shown["daemon"]["shm_dir"] == str(resolved.shm_path)
    again = run_cli("serve", "--check", "--config", str(write(tmp_path, res.stdout, "shown.toml")))
    assert again.returncode == 0, again.stderr
    assert again.stdout == res.stdout  # the printed config is a config file that means the same


def test_check_json(tmp_path: Path) -> None:
    root = tmp_path / "r"
    res = run_cli("serve", "--check", "--json", "--root", str(root), "--budget-bytes", "64MiB")
    assert res.returncode == 0, res.stderr
    shown = json.loads(res.stdout)
    assert shown["daemon"]["socket"] == str(root / "run" / "ckptd.sock")
    assert shown["daemon"]["shm_dir"].startswith("/dev/shm/ckptd-")
    assert shown["memory"]["budget_bytes"] == 64 * 2**20
    assert shown == tomllib.loads(run_cli("serve", "--check", "--root", str(root), "--budget-bytes", "64MiB").stdout)


@pytest.mark.parametrize("fmt", [[], ["--json"]])
def test_check_into_a_closed_pipe_prints_no_traceback(tmp_path: Path, fmt: list[str]) -> None:
    r, w = os.pipe()
    os.close(r)  # the reader is gone (`ckptd serve --check | head -1` after head exits)
    try:
        res = subprocess.run([sys.executable, "-m", "ckptd.daemon.cli", "serve", "--check", *fmt,
                              "--root", str(tmp_path / "r")], stdout=w, stderr=subprocess.PIPE, text=True,
                             timeout=60, env=clean_env())
    finally:
        os.close(w)
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr
    assert res.returncode == 1


@pytest.mark.parametrize("where", ["flag", "env", "file"])
def test_budget_below_one_slot_is_refused(tmp_path: Path, where: str) -> None:
    args = ["serve", "--check", "--root", str(tmp_path / "r")]
    env = {}
    if where == "flag":
        args += ["--budget-bytes", "1"]
    elif where == "env":
        env["CKPTD_MEMORY_BUDGET_BYTES"] = "1"
    else:
        args += ["--config", str(write(tmp_path, "[memory]\nbudget_bytes = 1\n"))]
    res = run_cli(*args, env=env)
    assert res.returncode == 2, res.stdout
    assert "memory.budget_bytes" in res.stderr and "2MiB" in res.stderr, res.stderr
    with pytest.raises(InvalidArgument, match="memory.budget_bytes"):
        load(env={"CKPTD_MEMORY_BUDGET_BYTES": str(2 * 2**20 - 1)})
    assert load(env={"CKPTD_MEMORY_BUDGET_BYTES": "2MiB"}).memory.budget_bytes == 2 * 2**20


def test_daemon_scheduling_options_parse_and_apply_in_a_child() -> None:
    """daemon.nice and daemon.cpu_affinity: parsed, validated, and applied (in a child process, so
    this test's own priority and CPUs stay as they are); CPUs the process may not use are refused."""
    from ckptd.core import sched

    assert sched.parse_cpu_list("0,2-3, 5") == frozenset({0, 2, 3, 5}) and sched.parse_cpu_list("") == frozenset()
    cfg = load(env={"CKPTD_DAEMON_NICE": "5", "CKPTD_DAEMON_CPU_AFFINITY": "0"})
    assert (cfg.daemon.nice, cfg.daemon.cpu_affinity) == (5, "0")
    with pytest.raises(InvalidArgument, match="may not use"):
        sched.apply(0, "4095")
    code = ("import os; from ckptd.core import sched; b = os.nice(0); sched.apply(5, '0'); "
            "print(os.nice(0) - b, sorted(os.sched_getaffinity(0)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split(None, 1) == ["5", "[0]\n"]
