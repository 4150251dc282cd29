"""The test S3 server behaves as the replica tests assume.

The replica tests lean on two facts about their S3 peers: moto refuses a
conditional write that fails (412), and the blind front overwrites instead.
If either stops holding (a moto upgrade, say), those tests would prove nothing.
"""

from __future__ import annotations

import botocore.session
import pytest
from botocore.exceptions import ClientError

from tests.support.s3 import BlindFront, Bucket, MotoServer


def _status(exc: ClientError) -> int:
    return int(exc.response["ResponseMetadata"]["HTTPStatusCode"])


def test_moto_refuses_a_create_over_an_existing_key(s3_bucket: Bucket) -> None:
    client = s3_bucket.client()
    client.put_object(Bucket=s3_bucket.name, Key="k", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as refused:
        client.put_object(Bucket=s3_bucket.name, Key="k", Body=b"second", IfNoneMatch="*")
    assert _status(refused.value) == 412
    assert s3_bucket.get("k") == b"first"


def test_moto_refuses_a_replace_of_a_changed_object(s3_bucket: Bucket) -> None:
    client = s3_bucket.client()
    etag = client.put_object(Bucket=s3_bucket.name, Key="k", Body=b"v1")["ETag"]
    client.put_object(Bucket=s3_bucket.name, Key="k", Body=b"v2", IfMatch=etag)
    with pytest.raises(ClientError) as refused:
        client.put_object(Bucket=s3_bucket.name, Key="k", Body=b"v3", IfMatch=etag)
    assert _status(refused.value) == 412
    assert s3_bucket.get("k") == b"v2"


def test_the_blind_front_overwrites_despite_the_condition(moto_server: MotoServer) -> None:
    with BlindFront(moto_server.endpoint_url) as front:
        bucket = moto_server.bucket(endpoint_url=front.endpoint_url)
        bucket.client().put_object(Bucket=bucket.name, Key="k", Body=b"first")
        # Through the front, the conditional create succeeds over an existing key.
        blind = botocore.session.get_session().create_client(
            "s3", endpoint_url=front.endpoint_url, region_name="us-east-1",
            aws_access_key_id="x", aws_secret_access_key="y",
        )
        blind.put_object(Bucket=bucket.name, Key="k", Body=b"second", IfNoneMatch="*")
        assert bucket.get("k") == b"second"
        assert front.dropped >= 1
