"""Every name or id checked against an allow-list grammar must match it whole: a trailing newline
(which ``$`` lets through) is refused for job names, node ids, failure domains, hosts, object
prefixes, buckets, endpoints, step directory names and ``JOB@STEP`` identities."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ckptd.core import config as config_mod
from ckptd.core.config.peers import PeerSection, parse_hostport, parse_peers, validate_peers
from ckptd.core.errors import InvalidArgument
from ckptd.core.types import parse_step_dirname, validate_job
from ckptd.ctl.model import parse_identity
from ckptd.peers.types import validate_node_id


@pytest.mark.parametrize("tail", ["\n", "\r\n", " \n"])
def test_trailing_newline_is_refused_everywhere(tail: str) -> None:
    with pytest.raises(ValueError, match="job name"):
        validate_job("job" + tail)
    with pytest.raises(ValueError, match="node id"):
        validate_node_id("node-1" + tail)
    assert parse_step_dirname("step-000000000001" + tail) is None
    with pytest.raises(InvalidArgument):
        parse_hostport("host" + tail + ":7070", "peers.listen")
    with pytest.raises(InvalidArgument):
        parse_peers(["n1=host" + tail + ":7070@rack"], "peers.peers")
    with pytest.raises(InvalidArgument, match="failure_domain"):
        validate_peers(PeerSection(failure_domain="rack" + tail))
    with pytest.raises(InvalidArgument):
        parse_identity("job@5" + tail)
    obj = config_mod.ObjectSection(enabled=True, bucket="bucket")
    for bad in (replace(obj, bucket="bucket" + tail), replace(obj, prefix="a/b" + tail),
                replace(obj, endpoint_url="http://host:9000" + tail)):
        with pytest.raises(InvalidArgument, match="object"):
            config_mod.validate_object(bad)


def test_valid_names_still_pass() -> None:
    assert validate_job("gpt-7b_v1.2") == "gpt-7b_v1.2"
    assert validate_node_id("node-1") == "node-1"
    assert parse_step_dirname("step-000000000042") == 42
    assert parse_identity("job@5").step == 5
