"""Fixtures of the integration tests (``daemon_factory``, ``daemon``, ``moto_s3`` and ``proxy`` are
in tests/conftest.py).

``mod_daemon`` is one ``ckptd serve`` per test module that keeps every saved step on disk
(retention is not under test where it is used); a module that needs another daemon for all its
tests (tests/integration/test_bad_input.py) defines its own ``mod_daemon``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests._ckptd_helpers import Daemon, running_daemon


@pytest.fixture(scope="module")
def mod_daemon(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    name = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    with running_daemon(tmp_path_factory.mktemp(name), env={"CKPTD_DISK_MAX_TO_KEEP": "10"}) as d:
        yield d
