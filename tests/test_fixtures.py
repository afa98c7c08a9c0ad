"""The test infrastructure itself: real servers over real connections."""

from __future__ import annotations

import json

import boto3
import psycopg

from service.database import parse_database_url


def test_postgres_schema_is_private_to_the_test(pg_url: str) -> None:
    config = parse_database_url(pg_url)
    assert config.schema.startswith("t_")
    with psycopg.connect(config.conninfo()) as conn:  # type: ignore[arg-type]
        name = conn.execute("SELECT current_database()").fetchone()
    assert name is not None and name[0].startswith("resultsvc_test_")


def test_boto3_reaches_moto_over_http_through_its_own_settings(aws: str) -> None:
    s3 = boto3.client("s3")  # no endpoint_url: boto3 reads AWS_ENDPOINT_URL
    s3.create_bucket(
        Bucket="fixture-check", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
    )
    s3.put_object(Bucket="fixture-check", Key="k", Body=b"v")
    # boto3 took the endpoint from its own settings, and the object is there
    # when read back over that real HTTP connection.
    assert s3.meta.endpoint_url == aws
    assert s3.get_object(Bucket="fixture-check", Key="k")["Body"].read() == b"v"
    identity = boto3.client("sts").get_caller_identity()
    assert json.dumps(identity["Account"]).strip('"').isdigit()
