"""Storage without moto: botocore's retry policy against a tiny endpoint, local listings and fingerprints, secrets kept out of messages."""

from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from medctl.errors import DataError, StorageUnavailable
from medctl.storage import fetch, is_transient, list_files, redact_secrets


def client_error(status: int, code: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


class Answers(BaseHTTPRequestHandler):
    """An S3 endpoint that answers every request with the class's status (and counts them)."""

    status = 503
    seen: list[str] = []

    def _answer(self) -> None:
        type(self).seen.append(self.command)
        code = {503: "SlowDown", 403: "AccessDenied"}[self.status]
        body = f"<Error><Code>{code}</Code><Message>{code}</Message></Error>".encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def answering_endpoint(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Answers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
    Answers.seen = []
    yield Answers
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("retries", [0, 2])
def test_botocore_retries_transient_failures_data_source_retries_times(answering_endpoint, retries):
    answering_endpoint.status = 503  # throttled: botocore's standard mode retries it, with backoff
    with pytest.raises(StorageUnavailable, match=r"^cannot list s3://bucket/d/: .*SlowDown$"):
        list_files("s3://bucket/d/", retries=retries)
    assert len(answering_endpoint.seen) == retries + 1  # one request, then data.source.retries more


def test_403_is_not_retried_and_is_said_in_plain_words(answering_endpoint):
    answering_endpoint.status = 403
    with pytest.raises(DataError, match=r"cannot list s3://bucket/d/: access denied") as caught:
        list_files("s3://bucket/d/", retries=3)
    assert not isinstance(caught.value, StorageUnavailable)
    assert len(answering_endpoint.seen) == 1


def test_what_counts_as_transient():
    assert not is_transient(client_error(404, "NoSuchKey")) and is_transient(client_error(500, "InternalError"))
    assert not is_transient(PermissionError("denied")) and not is_transient(FileNotFoundError("gone"))
    assert is_transient(ConnectionError("reset")) and is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert is_transient(OSError("s3fs maps 5xx to a bare OSError")) and not is_transient(ValueError("bug"))


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
