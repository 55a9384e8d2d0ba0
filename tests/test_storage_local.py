"""Storage without a server: retry policy, local listings and fingerprints, secrets kept out of messages."""

from __future__ import annotations

import os

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from medctl.errors import DataError
from medctl.storage import fetch, is_transient, list_files, redact_secrets, with_retries


def flaky(failures: list[BaseException]):
    calls = []

    def fn():
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return "done"

    return fn, calls


def client_error(status: int, code: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


def test_transient_failures_are_retried_with_backoff(monkeypatch):
    sleeps = []
    monkeypatch.setattr("medctl.storage.time.sleep", sleeps.append)
    fn, calls = flaky(
        [
            ConnectionError("reset"),
            EndpointConnectionError(endpoint_url="http://x"),
            client_error(503, "SlowDown"),
        ]
    )
    assert with_retries(fn, retries=3, what="get") == "done"
    assert len(calls) == 4 and sleeps == [0.5, 1.0, 2.0]  # exponential backoff


def test_403_and_404_are_not_retried(monkeypatch):
    monkeypatch.setattr("medctl.storage.time.sleep", lambda s: pytest.fail("slept on a permanent error"))
    for error in (PermissionError("denied"), FileNotFoundError("gone"), client_error(403, "AccessDenied")):
        fn, calls = flaky([error])
        with pytest.raises(type(error)):
            with_retries(fn, retries=5, what="get")
        assert len(calls) == 1
    assert not is_transient(client_error(404, "NoSuchKey")) and is_transient(
        client_error(500, "InternalError")
    )
    assert is_transient(OSError("s3fs maps 5xx to a bare OSError")) and not is_transient(ValueError("bug"))


def test_retries_give_up_after_the_limit(monkeypatch):
    monkeypatch.setattr("medctl.storage.time.sleep", lambda s: None)
    fn, calls = flaky([TimeoutError("slow")] * 5)
    with pytest.raises(TimeoutError):
        with_retries(fn, retries=2, what="get")
    assert len(calls) == 3


def test_local_listing_skips_hidden_files_and_fingerprints_change(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.nrrd").write_bytes(b"12345")
    (tmp_path / ".DS_Store").write_bytes(b"junk")
    listing = list_files(str(tmp_path))
    assert list(listing.files) == ["a/x.nrrd"] and listing.files["a/x.nrrd"].size == 5
    before = listing.files["a/x.nrrd"].fingerprint
    (tmp_path / "a" / "x.nrrd").write_bytes(b"123456")
    assert list_files(str(tmp_path)).files["a/x.nrrd"].fingerprint != before
    assert list(list_files(str(tmp_path), prefix="a/").files) == ["a/x.nrrd"]
    with pytest.raises(DataError, match="is not a folder"):
        list_files(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="not found: check the path"):
        fetch(str(tmp_path / "missing.tsv"), download_dir=tmp_path)


def test_secret_values_are_scrubbed(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    assert redact_secrets("bad signature for wJalrXUtnFEMI/K7MDENG") == "bad signature for ***"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "wJalrXUtnFEMI/K7MDENG"
