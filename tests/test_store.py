"""The object store module against the local S3 server (moto): uploads once, checked, idempotent."""

from __future__ import annotations

from pathlib import Path

import pytest

from crawler.archive.store import PART_SIZE, ObjectStore, digest_file, parse_url
from crawler.errors import StoreError
from objectstore import ObjectStoreFixture, write_file


def test_urls_parse_or_say_why() -> None:
    url = parse_url("s3://my-bucket/some/prefix/")
    assert (url.bucket, url.prefix) == ("my-bucket", "some/prefix")
    assert url.url("a/b.txt") == "s3://my-bucket/some/prefix/a/b.txt"
    assert parse_url("s3://b1").url("x") == "s3://b1/x"
    for bad in ("http://b/x", "s3://", "s3://Upper/x", "s3://b/../x", "s3://user:pw@b/x", "s3://b/x?y"):
        with pytest.raises(ValueError):
            parse_url(bad)


def test_upload_small_and_multipart_byte_exact(objectstore: ObjectStoreFixture, tmp_path: Path) -> None:
    store = objectstore.store()
    small = write_file(tmp_path / "small", 1000)
    big = write_file(tmp_path / "big", 2 * PART_SIZE + 12345, seed=3)
    one = store.upload(tmp_path / "small", "s/small")
    two = store.upload(tmp_path / "big", "s/big")
    assert two.etag.endswith("-3") and "-" not in one.etag  # a multipart upload of three parts
    assert two.etag == digest_file(tmp_path / "big").etag
    assert objectstore.objects() == {"archive/s/small": small, "archive/s/big": big}
    assert store.head("s/big") == two and store.head("s/none") is None
    assert store.sizes() == {"s/small": 1000, "s/big": len(big)}


def test_a_second_upload_of_the_same_file_uploads_nothing(
    objectstore: ObjectStoreFixture, tmp_path: Path
) -> None:
    store = objectstore.store()
    write_file(tmp_path / "f", 5000)
    store.upload(tmp_path / "f", "f")
    store.upload(tmp_path / "f", "f")
    assert objectstore.proxy.created() == {f"/{objectstore.bucket}/archive/f": 1}
    write_file(tmp_path / "f", 5000, seed=9)  # other bytes, same size: replaced
    store.upload(tmp_path / "f", "f")
    assert objectstore.objects()["archive/f"] == (tmp_path / "f").read_bytes()


def test_a_500_is_retried_by_the_client(objectstore: ObjectStoreFixture, tmp_path: Path) -> None:
    data = write_file(tmp_path / "f", 3000)
    objectstore.proxy.fail_next(2)
    objectstore.store().upload(tmp_path / "f", "f")
    assert [p.status for p in objectstore.proxy.log if p.method == "PUT"] == [500, 500, 200]
    assert objectstore.objects() == {"archive/f": data}


def test_a_store_that_keeps_failing_is_one_line_naming_the_object(
    objectstore: ObjectStoreFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_file(tmp_path / "f", 3000)
    objectstore.proxy.fail_next(100)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # botocore's own retries: two attempts, not five
    with pytest.raises(StoreError) as caught:
        objectstore.store().upload(tmp_path / "f", "f")
    message = str(caught.value)
    assert message.startswith(f"s3://{objectstore.bucket}/archive/f: upload failed") and "\n" not in message
    assert objectstore.sizes() == {}


def test_an_unfinished_multipart_upload_is_aborted_before_the_next(
    objectstore: ObjectStoreFixture, tmp_path: Path
) -> None:
    fs = objectstore.server.client()
    key = "archive/big"
    fs.call_s3("create_multipart_upload", Bucket=objectstore.bucket, Key=key)
    assert objectstore.unfinished() == [key]
    write_file(tmp_path / "big", 2 * PART_SIZE)
    objectstore.store().upload(tmp_path / "big", "big")
    assert objectstore.unfinished() == []
    assert objectstore.sizes() == {key: 2 * PART_SIZE}


def test_writer_streams_an_object_or_nothing(objectstore: ObjectStoreFixture) -> None:
    store = objectstore.store()
    with store.writer("w") as stream:
        stream.write(b"x" * (PART_SIZE + 10))
        stream.write(b"y" * 10)
    with pytest.raises(RuntimeError), store.writer("never") as stream:
        stream.write(b"z" * (PART_SIZE + 10))
        raise RuntimeError("the writer stops")
    assert objectstore.sizes() == {"archive/w": PART_SIZE + 20}
    assert objectstore.unfinished() == []


def test_no_credentials_is_one_line(objectstore: ObjectStoreFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoreError) as caught:
        ObjectStore(objectstore.url).head("x")
    assert "credentials" in str(caught.value).lower()
