"""
Storage: locations, round trips, patterns, compression, verification, retries,
error mapping and concurrency, on file://, memory:// and moto S3.
"""

from __future__ import annotations

import gzip
import os
import socket
import threading
from pathlib import Path

import boto3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kelpie_sdk.errors import (
    ConfigError,
    StorageError,
    StorageNotFoundError,
    StoragePermissionError,
)
from kelpie_sdk.storage import (
    Storage,
    TransferResult,
    _safe_join,
    storage_url_is_durable,
)
from tests.storage.conftest import NO_BOTOCORE_RETRIES
from tests.storage.proxy import (
    LOSE,
    TRUNCATE,
    Fault,
    S3FaultProxy,
    Seen,
    fail_first,
)


def read_tree(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` as {POSIX relative path: content}."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# -- location -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("root", "bucket", "prefix", "expected"),
    [
        ("s3://", "b", "p/", "s3://b/p/"),
        ("s3://", "b", "", "s3://b/"),
        ("s3://outer/base", "b", "p/x", "s3://outer/base/b/p/x"),
        ("file:///some/root", "b", "p/", "file:///some/root/b/p/"),
        ("file:///some/root/", "b", "p/k.txt", "file:///some/root/b/p/k.txt"),
        ("/plain/dir", "b", "p/", "file:///plain/dir/b/p/"),
        ("memory://m", "b", "p/", "memory://m/b/p/"),
    ],
    ids=[
        "s3",
        "s3-bucket-root",
        "s3-under-prefix",
        "file",
        "file-slash",
        "bare-path",
        "memory",
    ],
)
def test_url_maps_bucket_and_prefix(
    root: str, bucket: str, prefix: str, expected: str
) -> None:
    """A bucket and prefix map to a URL under the storage root."""
    with Storage(root, environ={}) as storage:
        assert expected == storage.url(bucket, prefix)


def test_root_falls_back_to_environment_then_s3() -> None:
    """KELPIE_STORAGE_URL is used when no root is given, and s3:// when it is unset."""
    with Storage(environ={"KELPIE_STORAGE_URL": "file:///from/env"}) as storage:
        assert "file:///from/env/b/p/" == storage.url("b", "p/")
    with Storage(environ={}) as storage:
        assert "s3://b/p/" == storage.url("b", "p/")


def test_bad_root_and_settings_are_config_errors() -> None:
    """A root that is not a URL, or nonsense limits, are configuration errors."""
    with pytest.raises(ConfigError, match="KELPIE_STORAGE_URL"):
        Storage("relative/dir", environ={})
    with pytest.raises(ConfigError, match="max_concurrency"):
        Storage("file:///x", max_concurrency=0)
    with pytest.raises(ConfigError, match="unknown storage_options"):
        Storage("s3://", storage_options={"anon": True}, environ={})


def test_file_root_puts_bucket_and_prefix_on_disk(
    file_storage: Storage, tmp_path: Path
) -> None:
    """With file:///root, bucket b and prefix p/ live at /root/b/p/."""
    src = tmp_path / "x.txt"
    src.write_bytes(b"data")
    file_storage.upload_files([(src, "dir/x.txt")], "bkt", "p")
    assert b"data" == (tmp_path / "store" / "bkt" / "p" / "dir" / "x.txt").read_bytes()
    assert [] == [
        p.name for p in (tmp_path / "store").rglob("*") if p.name.startswith(".")
    ]


def test_s3_root_with_path_nests_buckets(
    s3_bucket: str, moto_endpoint: str, tmp_path: Path
) -> None:
    """With s3://real/base, job bucket b and prefix p/ live at real/base/b/p/."""
    src = tmp_path / "x.txt"
    src.write_bytes(b"nested")
    with Storage(f"s3://{s3_bucket}/base") as storage:
        result = storage.upload_files([(src, "x.txt")], "job-bucket", "p")
        assert ("p/x.txt",) == result.keys
        assert [("x.txt", 6)] == storage.list("job-bucket", "p")
        storage.download_prefix("job-bucket", "p", tmp_path / "out")
    assert b"nested" == (tmp_path / "out" / "x.txt").read_bytes()
    body = boto3.client("s3").get_object(
        Bucket=s3_bucket, Key="base/job-bucket/p/x.txt"
    )
    assert b"nested" == body["Body"].read()


# -- round trips --------------------------------------------------------------


def test_nested_tree_round_trips(
    any_storage: tuple[Storage, str], tree: Path, tmp_path: Path
) -> None:
    """A nested tree uploaded and downloaded again is byte for byte the same."""
    storage, bucket = any_storage
    up = storage.upload_dir(tree, bucket, "job/in")
    expected = read_tree(tree)
    assert (
        TransferResult(
            files=len(expected),
            bytes=sum(map(len, expected.values())),
            keys=tuple(f"job/in/{rel}" for rel in sorted(expected)),
        )
        == up
    )
    assert sorted((rel, len(data)) for rel, data in expected.items()) == storage.list(
        bucket, "job/in/"
    )
    down = storage.download_prefix(bucket, "job/in/", tmp_path / "back")
    assert expected == read_tree(tmp_path / "back")
    assert (len(expected), tuple(sorted(expected))) == (down.files, down.keys)


def test_prefix_is_a_directory(
    any_storage: tuple[Storage, str], tmp_path: Path
) -> None:
    """Prefix p lists p/... but not p2/..., with or without its trailing slash."""
    storage, bucket = any_storage
    src = tmp_path / "f"
    src.write_bytes(b"1")
    storage.upload_files([(src, "a"), (src, "b/c")], bucket, "p")
    storage.upload_files([(src, "z")], bucket, "p2")
    assert [("a", 1), ("b/c", 1)] == storage.list(bucket, "p")
    assert [("a", 1), ("b/c", 1)] == storage.list(bucket, "p/")
    assert [("p/a", 1), ("p/b/c", 1), ("p2/z", 1)] == storage.list(bucket, "")


def test_download_replaces_existing_files(
    any_storage: tuple[Storage, str], tmp_path: Path
) -> None:
    """A download overwrites a stale local copy and keeps unrelated local files."""
    storage, bucket = any_storage
    src = tmp_path / "f"
    src.write_bytes(b"fresh")
    storage.upload_files([(src, "ckpt.bin")], bucket, "p")
    out = tmp_path / "out"
    out.mkdir()
    (out / "ckpt.bin").write_bytes(b"stale, longer content")
    (out / "mine.txt").write_bytes(b"keep")
    storage.download_prefix(bucket, "p", out)
    assert {"ckpt.bin": b"fresh", "mine.txt": b"keep"} == read_tree(out)


def test_empty_prefix_downloads_nothing(
    any_storage: tuple[Storage, str], tmp_path: Path
) -> None:
    """An empty prefix is not an error: zero files, and the directory exists."""
    storage, bucket = any_storage
    result = storage.download_prefix(bucket, "nothing/here", tmp_path / "out")
    assert TransferResult(files=0, bytes=0, keys=()) == result
    assert [] == list((tmp_path / "out").iterdir())


def test_upload_of_missing_directory_uploads_nothing(
    any_storage: tuple[Storage, str], tmp_path: Path
) -> None:
    """A local directory that does not exist uploads zero files."""
    storage, bucket = any_storage
    assert 0 == storage.upload_dir(tmp_path / "absent", bucket, "p").files


def test_delete_removes_one_object(
    any_storage: tuple[Storage, str], tmp_path: Path
) -> None:
    """delete removes the object; deleting it again is not an error."""
    storage, bucket = any_storage
    src = tmp_path / "f"
    src.write_bytes(b"1")
    storage.upload_files([(src, "a"), (src, "b")], bucket, "p")
    storage.delete(bucket, "p/a")
    storage.delete(bucket, "p/a")
    assert [("b", 1)] == storage.list(bucket, "p")


# -- patterns and compression ---------------------------------------------------


def test_download_pattern_matches_the_relative_key(
    any_storage: tuple[Storage, str], tree: Path, tmp_path: Path
) -> None:
    """The download pattern is searched in the key relative to the prefix."""
    storage, bucket = any_storage
    storage.upload_dir(tree, bucket, "in")
    # "^sub/" matches relative keys; on full keys ("in/sub/...") it would not.
    result = storage.download_prefix(bucket, "in", tmp_path / "out", pattern=r"^sub/")
    assert ("sub/b.json", "sub/deeper/.hidden", "sub/deeper/c.csv") == result.keys
    assert set(result.keys) == set(read_tree(tmp_path / "out"))


def test_upload_pattern_matches_the_relative_path(
    any_storage: tuple[Storage, str], tree: Path
) -> None:
    """The upload pattern is searched in each file's path relative to the directory."""
    storage, bucket = any_storage
    result = storage.upload_dir(tree, bucket, "out", pattern=r"\.(txt|csv)$")
    assert ("out/a.txt", "out/sub/deeper/c.csv") == result.keys


def test_invalid_pattern_is_a_storage_error(file_storage: Storage, tree: Path) -> None:
    """A pattern that does not compile is reported, not ignored."""
    with pytest.raises(StorageError, match="invalid pattern"):
        file_storage.upload_dir(tree, "bkt", "p", pattern="(")


def test_compression_round_trip(
    any_storage: tuple[Storage, str], tree: Path, tmp_path: Path
) -> None:
    """Compressed uploads get .gz keys with gzip content and decompress back."""
    storage, bucket = any_storage
    up = storage.upload_dir(tree, bucket, "gz", compress=True)
    expected = read_tree(tree)
    assert tuple(f"gz/{rel}.gz" for rel in sorted(expected)) == up.keys
    raw = storage.download_prefix(bucket, "gz", tmp_path / "raw")
    assert b"alpha" == gzip.decompress((tmp_path / "raw" / "a.txt.gz").read_bytes())
    assert raw.bytes == up.bytes
    storage.download_prefix(bucket, "gz", tmp_path / "back", decompress=True)
    assert expected == read_tree(tmp_path / "back")


def test_decompress_leaves_plain_objects_alone(
    any_storage: tuple[Storage, str], tmp_path: Path
) -> None:
    """With decompress, only keys ending in .gz are gunzipped and renamed."""
    storage, bucket = any_storage
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"as is")
    packed = tmp_path / "packed"
    packed.write_bytes(gzip.compress(b"unpacked"))
    storage.upload_files([(plain, "plain.txt"), (packed, "data.gz")], bucket, "p")
    result = storage.download_prefix(bucket, "p", tmp_path / "out", decompress=True)
    assert ("data", "plain.txt") == result.keys
    assert {"data": b"unpacked", "plain.txt": b"as is"} == read_tree(tmp_path / "out")


def test_s3_compressed_objects_carry_content_encoding(
    s3_storage: Storage, s3_bucket: str, tmp_path: Path
) -> None:
    """On S3 a compressed object has Content-Encoding gzip and the original's type."""
    src = tmp_path / "report.json"
    src.write_bytes(b"{}" * 1000)
    s3_storage.upload_files([(src, "report.json")], s3_bucket, "p", compress=True)
    head = boto3.client("s3").head_object(Bucket=s3_bucket, Key="p/report.json.gz")
    assert ("gzip", "application/json") == (
        head["ContentEncoding"],
        head["ContentType"],
    )


def test_key_escaping_the_target_is_refused(
    s3_storage: Storage, s3_bucket: str, tmp_path: Path
) -> None:
    """An object whose key would land outside the target directory is refused."""
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="p/../../evil", Body=b"x")
    with pytest.raises(StorageError, match="outside"):
        s3_storage.download_prefix(s3_bucket, "p", tmp_path / "out")
    assert not (tmp_path / "evil").exists()


# -- large files ----------------------------------------------------------------


@pytest.mark.slow
def test_multipart_file_round_trips_on_s3(
    s3_storage: Storage, s3_bucket: str, tmp_path: Path
) -> None:
    """A file above the multipart threshold goes up in parts and down in ranges."""
    src = tmp_path / "big.bin"
    data = os.urandom(40 * 1024 * 1024 + 123)
    src.write_bytes(data)
    up = s3_storage.upload_files([(src, "big.bin")], s3_bucket, "p")
    assert len(data) == up.bytes
    etag = boto3.client("s3").head_object(Bucket=s3_bucket, Key="p/big.bin")["ETag"]
    assert etag.endswith('-3"')  # 3 parts of 16 MiB
    s3_storage.download_prefix(s3_bucket, "p", tmp_path / "out")
    assert data == (tmp_path / "out" / "big.bin").read_bytes()


# -- verification ---------------------------------------------------------------


def test_verification_catches_a_lost_upload(
    proxy: S3FaultProxy, proxied: Storage, s3_bucket: str, tmp_path: Path
) -> None:
    """An upload the endpoint acknowledged but did not store fails verification."""
    good, lost = tmp_path / "good", tmp_path / "lost"
    good.write_bytes(b"g")
    lost.write_bytes(b"l")
    proxy.rule = lambda seen: (
        LOSE if seen.method == "PUT" and "/lost" in seen.path else None
    )
    with pytest.raises(StorageError, match="lost") as info:
        proxied.upload_files([(good, "good"), (lost, "lost")], s3_bucket, "p")
    assert "1 of 2 files failed to upload" in str(info.value)
    assert "not found after upload" in str(info.value)
    assert str(info.value).startswith(
        f"1 of 2 files failed to upload (s3://{s3_bucket}/p/): lost."
    )
    assert [("good", 1)] == proxied.list(s3_bucket, "p")


def test_verification_of_many_files_catches_a_lost_upload(
    proxy: S3FaultProxy,
    proxied: Storage,
    s3_bucket: str,
    sleeps: list[float],
    tmp_path: Path,
) -> None:
    """Many files are verified with one listing, which still catches a lost one."""
    files = []
    for i in range(30):
        (tmp_path / f"f{i:02d}").write_bytes(b"x" * i)
        files.append((tmp_path / f"f{i:02d}", f"f{i:02d}"))
    proxy.rule = lambda seen: (
        LOSE if seen.method == "PUT" and seen.path.endswith("/f17") else None
    )
    with pytest.raises(StorageError) as info:
        proxied.upload_files(files, s3_bucket, "p")
    assert str(info.value).startswith(
        f"1 of 30 files failed to upload (s3://{s3_bucket}/p/): f17."
    )
    assert "p/f17: not found after upload" in str(info.value)
    assert [] == proxy.requests("HEAD", "/p/")
    assert 1 == len(proxy.requests("GET", "list-type=2"))
    assert 29 == len(proxied.list(s3_bucket, "p"))


def test_without_verification_a_lost_upload_goes_unnoticed(
    proxy: S3FaultProxy, proxied: Storage, s3_bucket: str, tmp_path: Path
) -> None:
    """verify=False trusts the acknowledgement (this is what verification adds)."""
    lost = tmp_path / "lost"
    lost.write_bytes(b"l")
    proxy.rule = lambda seen: LOSE if seen.method == "PUT" else None
    result = proxied.upload_files([(lost, "lost")], s3_bucket, "p", verify=False)
    assert 1 == result.files
    assert [] == proxied.list(s3_bucket, "p")


def test_verification_catches_a_size_mismatch(
    file_storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stored object whose size differs from what was sent is a StorageError."""
    src = tmp_path / "f"
    src.write_bytes(b"12345")
    real = file_storage._backend.upload

    def truncating_upload(local: str, bucket: str, key: str, *args: object) -> None:
        real(local, bucket, key, None, None)
        Path(tmp_path, "store", bucket, key).write_bytes(b"12")

    monkeypatch.setattr(file_storage._backend, "upload", truncating_upload)
    with pytest.raises(StorageError, match="stored 2 bytes, sent 5"):
        file_storage.upload_files([(src, "f")], "bkt", "p")


# -- retries and errors ----------------------------------------------------------


def test_transient_errors_are_retried_with_backoff(
    proxy: S3FaultProxy,
    proxied: Storage,
    s3_bucket: str,
    sleeps: list[float],
    tmp_path: Path,
) -> None:
    """503 SlowDown twice, then success: the upload lands after two backoff sleeps."""
    src = tmp_path / "f"
    src.write_bytes(b"payload")
    proxy.rule = fail_first(2, Fault(503, "SlowDown"), "PUT", "/p/f")
    result = proxied.upload_files([(src, "f")], s3_bucket, "p")
    assert ("p/f",) == result.keys
    assert 3 == len(proxy.requests("PUT", "/p/f"))
    assert 2 == len(sleeps)
    assert 0.375 <= sleeps[0] <= 0.5
    assert 0.75 <= sleeps[1] <= 1.0
    body = boto3.client("s3").get_object(Bucket=s3_bucket, Key="p/f")["Body"].read()
    assert b"payload" == body


def test_download_retries_transient_errors(
    proxy: S3FaultProxy,
    proxied: Storage,
    s3_bucket: str,
    sleeps: list[float],
    tmp_path: Path,
) -> None:
    """A GET that fails with 500 is retried and the file arrives intact."""
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="p/f", Body=b"ok")
    proxy.rule = fail_first(1, Fault(500, "InternalError"), "GET", "/p/f")
    proxied.download_prefix(s3_bucket, "p", tmp_path / "out")
    assert b"ok" == (tmp_path / "out" / "f").read_bytes()
    assert 1 == len(sleeps)


@pytest.mark.parametrize(
    ("size", "retries", "gets"),
    [(100_000, 1, 2), (17 * 1024 * 1024, 0, 3)],
    ids=["one-get-retried-by-storage", "ranged-retried-by-s3transfer"],
)
def test_download_cut_off_mid_body_is_retried(
    proxy: S3FaultProxy,
    proxied: Storage,
    s3_bucket: str,
    sleeps: list[float],
    tmp_path: Path,
    size: int,
    retries: int,
    gets: int,
) -> None:
    """
    A connection that drops halfway through a body is retried; no partial file stays.

    A small object is fetched again by Storage (one backoff sleep); a large one's
    range is fetched again inside s3transfer, which retries cut-off streams itself.
    """
    data = os.urandom(size)
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="p/f", Body=data)
    cut = iter(range(1))
    proxy.rule = lambda seen: (
        TRUNCATE
        if seen.method == "GET" and "/p/f" in seen.path and next(cut, None) is not None
        else None
    )
    result = proxied.download_prefix(s3_bucket, "p", tmp_path / "out")
    assert 1 == result.files
    assert data == (tmp_path / "out" / "f").read_bytes()
    assert ["f"] == [p.name for p in (tmp_path / "out").iterdir()]
    assert (retries, gets) == (len(sleeps), len(proxy.requests("GET", "/p/f")))


def test_exhausted_retries_raise_and_name_only_the_failing_keys(
    proxy: S3FaultProxy,
    proxied: Storage,
    s3_bucket: str,
    sleeps: list[float],
    tmp_path: Path,
) -> None:
    """One key always fails: the others still land, and the error names that key."""
    files = []
    for name in ("a", "b", "bad", "c"):
        (tmp_path / name).write_bytes(name.encode())
        files.append((tmp_path / name, name))
    proxy.rule = lambda seen: (
        Fault(500, "InternalError") if seen.path.endswith("/p/bad") else None
    )
    with pytest.raises(StorageError) as info:
        proxied.upload_files(files, s3_bucket, "p")
    assert type(info.value) is StorageError
    assert str(info.value).startswith(
        f"1 of 4 files failed to upload (s3://{s3_bucket}/p/): bad."
    )
    assert "after 4 attempts" in str(info.value)
    assert "InternalError" in str(info.value.__cause__)
    assert 4 == len(proxy.requests("PUT", "/p/bad"))
    assert 3 == len(sleeps)
    assert [("a", 1), ("b", 1), ("c", 1)] == proxied.list(s3_bucket, "p")


@pytest.mark.parametrize(
    "code", ["AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"]
)
def test_rejected_credentials_are_permanent(
    proxy: S3FaultProxy,
    proxied: Storage,
    s3_bucket: str,
    sleeps: list[float],
    tmp_path: Path,
    code: str,
) -> None:
    """403 credential errors raise StoragePermissionError at once, without retries."""
    src = tmp_path / "f"
    src.write_bytes(b"x")
    proxy.rule = lambda seen: Fault(403, code)
    with pytest.raises(
        StoragePermissionError, match="credentials were rejected"
    ) as info:
        proxied.upload_files([(src, "f")], s3_bucket, "p")
    assert code in str(info.value)
    assert [] == sleeps
    assert 1 == len(proxy.requests("PUT", "/p/f"))
    with pytest.raises(
        StoragePermissionError, match=f"rejected for s3://{s3_bucket}/in/"
    ):
        proxied.download_prefix(s3_bucket, "in", tmp_path / "out")


def test_wrong_access_key_is_named_in_the_error(
    proxy: S3FaultProxy, s3_bucket: str, sleeps: list[float], tmp_path: Path
) -> None:
    """An unknown access key gives a permission error that names the URL."""

    def reject_unknown_keys(seen: Seen) -> Fault | None:
        if "Credential=wrong-key/" in seen.authorization:
            return Fault(403, "InvalidAccessKeyId")
        return None

    proxy.rule = reject_unknown_keys
    with (
        Storage(
            "s3://",
            storage_options={
                "endpoint_url": proxy.endpoint,
                "key": "wrong-key",
                "secret": "s",
            },
            sleep=sleeps.append,
        ) as storage,
        pytest.raises(StoragePermissionError) as info,
    ):
        storage.list(s3_bucket, "p")
    assert (
        f"storage credentials were rejected for s3://{s3_bucket}/p/: InvalidAccessKeyId"
        in str(info.value)
    )
    assert [] == sleeps


def test_missing_credentials_are_a_permission_error(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With no credentials anywhere, NoCredentialsError is a permission error."""
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    with (
        Storage("s3://", sleep=pytest.fail) as storage,
        pytest.raises(StoragePermissionError, match="no storage credentials") as info,
    ):
        storage.list("anything", "p")
    assert "NoCredentialsError" == type(info.value.__cause__).__name__


def test_connection_refused_is_retried_then_raised(
    s3_bucket: str, sleeps: list[float], tmp_path: Path
) -> None:
    """A port where nothing listens is retried, then the error names the key."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with (
        Storage(
            "s3://",
            storage_options={
                "endpoint_url": f"http://127.0.0.1:{port}",
                "config_kwargs": NO_BOTOCORE_RETRIES,
            },
            max_retries=2,
            sleep=sleeps.append,
        ) as storage,
        pytest.raises(StorageError, match=r"f\. upload of .* failed after 3 attempts"),
    ):
        storage.upload_files([(src, "f")], s3_bucket, "p")
    assert 2 == len(sleeps)


def test_missing_bucket_is_not_found(
    any_storage: tuple[Storage, str], tmp_path: Path, sleeps: list[float]
) -> None:
    """A bucket that does not exist is StorageNotFoundError, without retries."""
    storage, _ = any_storage
    with pytest.raises(StorageNotFoundError):
        storage.list("no-such-bucket", "p")
    with pytest.raises(StorageNotFoundError):
        storage.download_prefix("no-such-bucket", "p", tmp_path / "out")
    assert [] == sleeps


def test_upload_to_missing_s3_bucket_stops_early(
    s3_storage: Storage, sleeps: list[float], tmp_path: Path
) -> None:
    """Uploading to a missing bucket raises not-found and names the keys that failed."""
    files = []
    for i in range(20):
        (tmp_path / f"f{i}").write_bytes(b"x")
        files.append((tmp_path / f"f{i}", f"f{i}"))
    with pytest.raises(StorageNotFoundError, match="no such bucket") as info:
        s3_storage.upload_files(files, "no-such-bucket", "p")
    assert "files failed to upload (s3://no-such-bucket/p/): f" in str(info.value)
    assert [] == sleeps


def test_missing_local_file_is_not_retried(
    s3_storage: Storage, s3_bucket: str, sleeps: list[float], tmp_path: Path
) -> None:
    """A local file that vanished is reported at once, not retried."""
    with pytest.raises(StorageError, match="cannot read"):
        s3_storage.upload_files([(tmp_path / "gone", "gone")], s3_bucket, "p")
    assert [] == sleeps


# -- concurrency ------------------------------------------------------------------


@pytest.mark.parametrize(("limit", "count"), [(1, 3), (6, 12)])
def test_transfers_run_in_parallel_up_to_the_limit(
    proxy: S3FaultProxy, s3_bucket: str, tmp_path: Path, limit: int, count: int
) -> None:
    """Exactly max_concurrency files are in flight at once: never more, never fewer."""
    files = []
    for i in range(count):
        (tmp_path / f"f{i}").write_bytes(b"x")
        files.append((tmp_path / f"f{i}", f"f{i}"))
    # Each request is held long enough for every worker thread to have started one.
    proxy.hold = 0.2
    with Storage(
        "s3://",
        storage_options={"endpoint_url": proxy.endpoint},
        max_concurrency=limit,
    ) as storage:
        result = storage.upload_files(files, s3_bucket, "p", verify=False)
    assert (count, limit) == (result.files, proxy.max_in_flight)


def test_one_storage_serves_several_threads(
    any_storage: tuple[Storage, str], tmp_path: Path
) -> None:
    """Several threads can share one Storage, each moving its own prefix."""
    storage, bucket = any_storage
    errors: list[BaseException] = []

    def job(n: int) -> None:
        try:
            src = tmp_path / f"src{n}"
            src.mkdir()
            for i in range(5):
                (src / f"{i}.bin").write_bytes(bytes([n, i]) * 100)
            storage.upload_dir(src, bucket, f"job{n}")
            storage.download_prefix(bucket, f"job{n}", tmp_path / f"dst{n}")
            assert read_tree(src) == read_tree(tmp_path / f"dst{n}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [] == errors


def test_permanent_failure_starts_no_more_files(
    s3_bucket: str, sleeps: list[float], tmp_path: Path
) -> None:
    """After a not-found failure, files not yet started are skipped and counted."""
    files = []
    for i in range(5):
        (tmp_path / f"f{i}").write_bytes(b"x")
        files.append((tmp_path / f"f{i}", f"f{i}"))
    with (
        Storage("s3://", max_concurrency=1, sleep=sleeps.append) as storage,
        pytest.raises(StorageNotFoundError) as info,
    ):
        storage.upload_files(files, "no-such-bucket", "p")
    assert str(info.value).startswith(
        "1 of 5 files failed to upload (s3://no-such-bucket/p/): f0; "
        "4 more not attempted."
    )
    assert [] == sleeps


@given(
    st.lists(
        st.sampled_from(["a", "b.txt", "..", ".", "", "c d", "é", "...", ".x"]),
        min_size=1,
        max_size=5,
    ).map("/".join)
)
def test_downloads_never_leave_the_target_directory(rel: str) -> None:
    """Any relative key either maps inside the target directory or is refused."""
    target = Path("/target/dir")
    try:
        dest = _safe_join(target, rel, "s3://b/" + rel)
    except StorageError:
        return
    assert target in dest.parents
    assert ".." not in dest.parts


@pytest.mark.parametrize(
    ("url", "durable"),
    [
        ("s3://", False),
        ("s3://shared/kelpie", True),
        ("file:///srv/kelpie", True),
        ("/srv/kelpie", True),
        ("file:///", False),
        ("memory://root", False),
        ("gs://bucket", True),
    ],
)
def test_durable_storage_roots(url: str, durable: bool) -> None:
    """A root is durable when it names a place outside one process's memory."""
    assert durable is storage_url_is_durable(url)
