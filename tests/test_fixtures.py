"""
The shared fixtures themselves work.
"""

from __future__ import annotations

import boto3


def test_moto_bucket_round_trip(s3_bucket: str, moto_endpoint: str) -> None:
    """An object written to the moto bucket reads back."""
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    s3.put_object(Bucket=s3_bucket, Key="k", Body=b"v")
    assert b"v" == s3.get_object(Bucket=s3_bucket, Key="k")["Body"].read()
