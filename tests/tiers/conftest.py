"""Fixtures of the tier tests (``moto_s3``, the S3 endpoint itself, is in tests/conftest.py).

``s3_client`` is a boto3 client of moto's endpoint; ``make_tier(client_config=None, **overrides)``
builds an ObjectTier on moto's bucket under a key prefix of its own per test, so tests never see
each other's objects; tiers are closed at teardown.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from ckptd.core.config import ObjectSection
from ckptd.tiers.object import ObjectTier
from tests.tiers._moto import MiB, MotoS3, TierFactory


@pytest.fixture
def s3_client(moto_s3: MotoS3) -> Any:
    return moto_s3.client()


@pytest.fixture
def make_tier(moto_s3: MotoS3) -> Iterator[TierFactory]:
    tiers: list[ObjectTier] = []
    prefix = f"t-{uuid.uuid4().hex[:10]}"

    def make(client_config: Any = None, **overrides: Any) -> ObjectTier:
        fields: dict[str, Any] = {
            "enabled": True, "preset": "minio", "endpoint_url": moto_s3.endpoint_url,
            "region": "us-east-1", "bucket": moto_s3.bucket, "prefix": prefix,
            "part_size_bytes": 5 * MiB, "max_concurrency": 4, "max_attempts": 3,
            "connect_timeout_s": 5.0, "read_timeout_s": 10.0, "total_timeout_s": 30.0,
        }
        fields.update(overrides)
        tier = ObjectTier(ObjectSection(**fields), client_config=client_config)
        tiers.append(tier)
        return tier

    yield make
    for t in tiers:
        t.close()
