"""The test S3 server (SeaweedFS via tests.support.s3server) behaves like S3 where we rely on it.

Findings for SeaweedFS 4.48 (asserted below, so a version bump that changes them is noticed):
- put_object(IfNoneMatch="*") on an existing key -> 412 PreconditionFailed (honoured).
- a wrong ChecksumSHA256 on put_object and on upload_part -> 400 BadDigest (validated).
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import subprocess
import sys

import pytest
from botocore.exceptions import ClientError

from tests.support.s3server import S3Server

pytestmark = pytest.mark.timeout(120)


def _code(e: ClientError) -> tuple[str, int]:
    return e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"]


def _sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def test_fixture_shape(s3_bucket):
    server, bucket, url = s3_bucket
    assert url == f"s3://{bucket}/run"
    assert s3_bucket.prefix == "run"
    assert server.endpoint_url.startswith("http://127.0.0.1:")
    env = server.env()
    assert env["AWS_ENDPOINT_URL"] == server.endpoint_url
    assert env["AWS_ACCESS_KEY_ID"] == server.access_key
    assert env["AWS_SECRET_ACCESS_KEY"] == server.secret_key
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    # fresh and empty
    assert server.client().list_objects_v2(Bucket=bucket)["KeyCount"] == 0


def test_put_get_roundtrip(s3_bucket):
    server, bucket, _ = s3_bucket
    c = server.client()
    body = os.urandom(300_000)
    c.put_object(Bucket=bucket, Key="run/a/blob.bin", Body=body)
    assert c.get_object(Bucket=bucket, Key="run/a/blob.bin")["Body"].read() == body
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=bucket, Prefix="run/")["Contents"]]
    assert keys == ["run/a/blob.bin"]
    c.delete_object(Bucket=bucket, Key="run/a/blob.bin")
    with pytest.raises(ClientError) as ei:
        c.get_object(Bucket=bucket, Key="run/a/blob.bin")
    assert _code(ei.value) == ("NoSuchKey", 404)


def test_env_works_for_subprocess(s3_bucket):
    """env() alone (no explicit endpoint/keys) is enough for boto3 in a child process."""
    server, bucket, _ = s3_bucket
    server.client().put_object(Bucket=bucket, Key="run/x", Body=b"from-parent")
    code = (
        "import boto3,sys;"
        f"print(boto3.client('s3').get_object(Bucket='{bucket}', Key='run/x')['Body'].read().decode())"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(server.env())
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "from-parent"


@pytest.mark.parametrize(
    ("access", "secret", "expected_code"),
    [
        (None, "wrong-secret", "SignatureDoesNotMatch"),
        ("unknown-key", None, "InvalidAccessKeyId"),
    ],
)
def test_bad_credentials_rejected(s3_bucket, access, secret, expected_code):
    server, bucket, _ = s3_bucket
    bad = server.client(access_key=access, secret_key=secret, retries={"max_attempts": 1})
    with pytest.raises(ClientError) as ei:
        bad.put_object(Bucket=bucket, Key="run/x", Body=b"x")
    assert _code(ei.value) == (expected_code, 403)
    with pytest.raises(ClientError) as ei:
        bad.list_objects_v2(Bucket=bucket)
    assert _code(ei.value)[1] == 403


def test_missing_bucket(s3_server):
    c = s3_server.client()
    with pytest.raises(ClientError) as ei:
        c.put_object(Bucket="no-such-bucket-here", Key="k", Body=b"x")
    assert _code(ei.value) == ("NoSuchBucket", 404)
    with pytest.raises(ClientError) as ei:
        c.get_object(Bucket="no-such-bucket-here", Key="k")
    assert _code(ei.value) == ("NoSuchBucket", 404)
    with pytest.raises(ClientError) as ei:
        c.head_bucket(Bucket="no-such-bucket-here")
    assert _code(ei.value)[1] == 404


def test_multipart_upload(s3_bucket):
    server, bucket, _ = s3_bucket
    c = server.client()
    key = "run/big.bin"
    parts_data = [os.urandom(5 * 1024 * 1024), os.urandom(5 * 1024 * 1024), os.urandom(1234)]
    mpu = c.create_multipart_upload(Bucket=bucket, Key=key)
    parts = []
    for i, data in enumerate(parts_data, start=1):
        r = c.upload_part(Bucket=bucket, Key=key, UploadId=mpu["UploadId"], PartNumber=i, Body=data)
        parts.append({"PartNumber": i, "ETag": r["ETag"]})
    c.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=mpu["UploadId"], MultipartUpload={"Parts": parts}
    )
    assert c.get_object(Bucket=bucket, Key=key)["Body"].read() == b"".join(parts_data)
    # abort path leaves nothing behind
    mpu2 = c.create_multipart_upload(Bucket=bucket, Key="run/aborted.bin")
    c.upload_part(
        Bucket=bucket, Key="run/aborted.bin", UploadId=mpu2["UploadId"], PartNumber=1, Body=b"x"
    )
    c.abort_multipart_upload(Bucket=bucket, Key="run/aborted.bin", UploadId=mpu2["UploadId"])
    with pytest.raises(ClientError):
        c.head_object(Bucket=bucket, Key="run/aborted.bin")


def test_if_none_match_star_is_honoured(s3_bucket):
    server, bucket, _ = s3_bucket
    c = server.client()
    c.put_object(Bucket=bucket, Key="run/once", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as ei:
        c.put_object(Bucket=bucket, Key="run/once", Body=b"second", IfNoneMatch="*")
    assert _code(ei.value) == ("PreconditionFailed", 412)
    assert c.get_object(Bucket=bucket, Key="run/once")["Body"].read() == b"first"


def test_wrong_sha256_rejected_on_put_object(s3_bucket):
    server, bucket, _ = s3_bucket
    c = server.client()
    body = b"payload" * 1000
    with pytest.raises(ClientError) as ei:
        c.put_object(
            Bucket=bucket, Key="run/ck", Body=body, ChecksumSHA256=_sha256_b64(b"not the body")
        )
    assert _code(ei.value) == ("BadDigest", 400)
    with pytest.raises(ClientError) as ei:
        c.head_object(Bucket=bucket, Key="run/ck")
    assert _code(ei.value)[1] == 404
    # the right checksum is accepted and echoed
    r = c.put_object(Bucket=bucket, Key="run/ck", Body=body, ChecksumSHA256=_sha256_b64(body))
    assert r["ChecksumSHA256"] == _sha256_b64(body)


def test_wrong_sha256_rejected_on_upload_part(s3_bucket):
    server, bucket, _ = s3_bucket
    c = server.client()
    key = "run/mp-ck"
    mpu = c.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="SHA256")
    data = os.urandom(5 * 1024 * 1024)
    with pytest.raises(ClientError) as ei:
        c.upload_part(
            Bucket=bucket,
            Key=key,
            UploadId=mpu["UploadId"],
            PartNumber=1,
            Body=data,
            ChecksumSHA256=_sha256_b64(b"wrong"),
        )
    assert _code(ei.value) == ("BadDigest", 400)
    r = c.upload_part(
        Bucket=bucket,
        Key=key,
        UploadId=mpu["UploadId"],
        PartNumber=1,
        Body=data,
        ChecksumSHA256=_sha256_b64(data),
    )
    assert r["ChecksumSHA256"] == _sha256_b64(data)
    c.complete_multipart_upload(
        Bucket=bucket,
        Key=key,
        UploadId=mpu["UploadId"],
        MultipartUpload={
            "Parts": [{"PartNumber": 1, "ETag": r["ETag"], "ChecksumSHA256": r["ChecksumSHA256"]}]
        },
    )
    assert c.get_object(Bucket=bucket, Key=key)["Body"].read() == data


def test_two_servers_do_not_collide_and_stop_cleanly(tmp_path):
    """A second, independent server next to the session one; stop() frees its ports."""
    with S3Server(bucket="second-bucket") as srv:
        c = srv.client()
        c.put_object(Bucket="second-bucket", Key="k", Body=b"v")
        assert c.get_object(Bucket="second-bucket", Key="k")["Body"].read() == b"v"
        ports = dict(srv.ports)
        pid = srv.pid
    assert not srv.running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", ports["s3"])) != 0


# --------------------------------------------------------------------------- s3_proxy
def test_s3_proxy_pass_through(s3_proxy):
    assert s3_proxy.endpoint_url != s3_proxy.server.endpoint_url
    assert s3_proxy.env()["AWS_ENDPOINT_URL"] == s3_proxy.endpoint_url
    c = s3_proxy.client()
    c.put_object(Bucket=s3_proxy.bucket, Key="run/p", Body=b"via proxy")
    assert c.get_object(Bucket=s3_proxy.bucket, Key="run/p")["Body"].read() == b"via proxy"
    assert s3_proxy.connections >= 1
    assert s3_proxy.bytes_up > len(b"via proxy")
    assert s3_proxy.bytes_down > len(b"via proxy")


def test_s3_proxy_refuse_and_blackhole(s3_proxy):
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    c = s3_proxy.client(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=1)
    s3_proxy.refuse()
    with pytest.raises(EndpointConnectionError):
        c.head_bucket(Bucket=s3_proxy.bucket)
    s3_proxy.passthrough()
    c.head_bucket(Bucket=s3_proxy.bucket)
    s3_proxy.blackhole()
    with pytest.raises(ReadTimeoutError):
        c.head_bucket(Bucket=s3_proxy.bucket)
    s3_proxy.passthrough()
    s3_proxy.reset_all()
    c.head_bucket(Bucket=s3_proxy.bucket)


def test_s3_proxy_reset_mid_upload(s3_proxy):
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError

    body = os.urandom(2 * 1024 * 1024)
    c = s3_proxy.client(retries={"max_attempts": 1})
    s3_proxy.reset(after_bytes=256 * 1024)
    with pytest.raises((ConnectionClosedError, EndpointConnectionError)):
        c.put_object(Bucket=s3_proxy.bucket, Key="run/up", Body=body)
    assert s3_proxy.resets >= 1
    # nothing (or at least not a truncated object) became visible
    direct = s3_proxy.direct_client()
    with pytest.raises(ClientError):
        direct.head_object(Bucket=s3_proxy.bucket, Key="run/up")
    # a single reset, then boto3's own retry succeeds
    s3_proxy.reset(after_bytes=64 * 1024, once=True)
    retrying = s3_proxy.client(retries={"max_attempts": 3, "mode": "standard"})
    retrying.put_object(Bucket=s3_proxy.bucket, Key="run/up", Body=body)
    assert direct.get_object(Bucket=s3_proxy.bucket, Key="run/up")["Body"].read() == body
