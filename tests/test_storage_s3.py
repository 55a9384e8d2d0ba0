"""S3 through moto's real server on 127.0.0.1: listing, keys, failures in plain words, preprocess end to end."""

from __future__ import annotations

import json
import socket
from contextlib import contextmanager

import boto3
import numpy as np
import pandas as pd
import pytest
import requests

import medctl.data.preprocess as preprocess_module
from medctl.config import load_config
from medctl.data.checks import check_bucket
from medctl.data.locator import resolve
from medctl.data.preprocess import preprocess
from medctl.data.synthetic import make_synthetic_dataset
from medctl.errors import DataError, StorageUnavailable
from medctl.storage import filesystem, list_files, local_copy


def make_bucket(endpoint: str, name: str) -> None:
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)


def upload_dataset(endpoint: str, bucket: str, root, n: int = 8, seed: int = 0):
    """A synthetic dataset, uploaded under s3://bucket/study/ (images/, masks/, participants.tsv)."""
    ds = make_synthetic_dataset(root, n=n, seed=seed)
    make_bucket(endpoint, bucket)
    fs = filesystem("s3://x")
    for path in [ds.table, *ds.image_root.iterdir(), *ds.mask_root.iterdir()]:
        fs.put_file(str(path), f"{bucket}/study/{path.relative_to(ds.root).as_posix()}")
    return ds


def s3_config(ds, bucket: str, tmp_path, *extra):
    overrides = [
        o
        for o in ds.config_overrides()
        if not o.startswith(
            (
                "data.table=",
                "data.source.root=",
                "data.source.mask_root=",
                "data.cache_dir=",
                "data.download_dir=",
            )
        )
    ]
    return load_config(
        None,
        [
            *overrides,
            f'data.table="s3://{bucket}/study/participants.tsv"',
            f'data.source.root="s3://{bucket}/study/images/"',
            f'data.source.mask_root="s3://{bucket}/study/masks/"',
            f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}",
            f"data.download_dir={json.dumps(str(tmp_path / 'downloads'))}",
            "data.source.retries=1",
            *extra,
        ],
        env={},
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_listing_etags_and_key_resolution(s3_server, tmp_path):
    upload_dataset(s3_server, "listing", tmp_path / "ds")
    listing = list_files("s3://listing/study/images/")
    assert sorted(listing.files) == [f"sub-{i:03d}.nrrd" for i in range(1, 9)]
    info = listing.files["sub-001.nrrd"]
    assert info.url == "s3://listing/study/images/sub-001.nrrd" and info.size > 0
    assert info.fingerprint.startswith("etag:")
    res = resolve(["sub-001", "sub-404"], listing, "{participant_id}.nrrd")
    assert res.matches == {"sub-001": ("sub-001.nrrd",)} and res.missing == ["sub-404"]


def test_preprocess_from_a_bucket_end_to_end(s3_server, tmp_path, monkeypatch):
    ds = upload_dataset(s3_server, "study-bucket", tmp_path / "ds")
    config = s3_config(ds, "study-bucket", tmp_path)
    listed = []
    real_list = preprocess_module.list_files
    monkeypatch.setattr(
        preprocess_module, "list_files", lambda root, **kw: listed.append(root) or real_list(root, **kw)
    )
    result = preprocess(config.data, workers=1)
    assert listed == [
        "s3://study-bucket/study/images/",
        "s3://study-bucket/study/masks/",
    ]  # one listing per root
    assert (result.n_new, result.n_failed) == (6, 0)
    local = preprocess(load_config(None, ds.config_overrides(), env={}).data, workers=1)  # same files, local
    for id_ in result.manifest["id"]:
        np.testing.assert_array_equal(
            np.load(result.cache_dir / "images" / f"{id_}.npy"),
            np.load(local.cache_dir / "images" / f"{id_}.npy"),
        )
    assert result.manifest["fingerprint"].str.len().gt(0).all()
    downloads = sorted(p for p in (tmp_path / "downloads").rglob("*") if p.is_file())
    assert len(downloads) == 6 * 2 + 1  # images, masks and the table, each once

    fs = filesystem("s3://study-bucket")
    gets = []
    real_get = fs.get_file
    monkeypatch.setattr(fs, "get_file", lambda *a, **k: gets.append(a[0]) or real_get(*a, **k))
    again = preprocess(config.data, workers=1)
    assert (again.n_new, again.n_cached) == (0, 6) and gets == []  # nothing decoded, nothing downloaded
    fresh = preprocess(
        config.model_copy(deep=True).data.model_copy(update={"cache_dir": str(tmp_path / "c2")}), workers=1
    )
    assert fresh.n_new == 6 and gets == []  # a new cache re-decodes from the download cache


def test_missing_key_and_corrupt_object_are_recorded(s3_server, tmp_path):
    ds = upload_dataset(s3_server, "damaged", tmp_path / "ds")
    fs = filesystem("s3://damaged")
    fs.rm("damaged/study/images/sub-002.nrrd")
    fs.pipe("damaged/study/images/sub-003.nrrd", b"NRRD0004\ntype: short\ndimension: 3\n" + b"\x00" * 50)
    result = preprocess(s3_config(ds, "damaged", tmp_path).data, workers=1)
    failed = result.manifest.set_index("id").query("status == 'failed'")
    assert failed["stage"].to_dict() == {"sub-002": "locate", "sub-003": "read"}
    assert (
        "no key matches pattern 'sub-002.nrrd' under s3://damaged/study/images/"
        in failed.loc["sub-002", "error"]
    )
    errors = pd.read_csv(result.cache_dir / "data_errors.csv").set_index("id")
    assert errors.loc["sub-003", "key"] == "s3://damaged/study/images/sub-003.nrrd" and result.n_new == 4
    assert "downloads" not in errors.loc["sub-003", "error"]  # the source is named, not the local copy


@contextmanager
def enforced_auth(endpoint: str):
    """moto checks signatures and IAM policies only while auth is switched on."""
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
    try:
        yield
    finally:
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()


def test_denied_bucket_and_wrong_credentials_in_plain_words(s3_server, tmp_path, monkeypatch):
    make_bucket(s3_server, "open-bucket")
    make_bucket(s3_server, "locked-bucket")
    for bucket in ("open-bucket", "locked-bucket"):
        boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=bucket, Key="d/a.nrrd", Body=b"x")
    iam = boto3.client("iam", endpoint_url=s3_server)
    iam.create_user(UserName="reader")
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": "s3:*",
                "Resource": ["arn:aws:s3:::open-bucket", "arn:aws:s3:::open-bucket/*"],
            }
        ],
    }
    iam.put_user_policy(UserName="reader", PolicyName="open-only", PolicyDocument=json.dumps(policy))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    with enforced_auth(s3_server):
        assert list(list_files("s3://open-bucket/d/", retries=0).files) == ["a.nrrd"]
        with pytest.raises(DataError) as denied:
            list_files("s3://locked-bucket/d/", retries=0)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        with pytest.raises(DataError) as wrong:
            list_files("s3://open-bucket/d/", retries=0)
    assert str(denied.value).startswith(
        "cannot list s3://locked-bucket/d/: access denied to s3://locked-bucket/d/"
    )
    assert "check the credentials and the bucket policy" in str(denied.value)
    assert "signature" in str(wrong.value) and "access denied" in str(wrong.value)
    for message in (str(denied.value), str(wrong.value)):
        assert key["SecretAccessKey"] not in message and "not-the-secret" not in message


def test_check_bucket_rows(s3_server, tmp_path, monkeypatch):
    ds = upload_dataset(s3_server, "checked", tmp_path / "ds")
    config = s3_config(ds, "checked", tmp_path)
    rows = check_bucket(config.data, n_ids=3)
    assert [(r.name, r.ok) for r in rows] == [
        ("endpoint", True), ("credentials", True), ("listing", True), ("keys", True), ("read", True),
    ]  # fmt: skip
    assert "from S3_ENDPOINT_URL" in rows[0].detail and "testing" not in rows[1].detail
    assert rows[2].detail.startswith("8 files under s3://checked/study/images/")
    assert rows[3].detail == "3/3 ids matched (e.g. sub-001 -> sub-001.nrrd)"
    assert "shape (C=1, D=16, H=32, W=32), spacing (D 2, H 1, W 1) mm, dtype int16, intensity [" in rows[4].detail

    wrong_pattern = s3_config(ds, "checked", tmp_path, 'data.source.pattern="{participant_id}.nii.gz"')
    rows = check_bucket(wrong_pattern.data)
    assert rows[-1].name == "keys" and not rows[-1].ok
    assert (
        "sub-001: no key matches pattern 'sub-001.nii.gz' under s3://checked/study/images/" in rows[-1].detail
    )

    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    rows = check_bucket(config.data)
    assert [(r.name, r.ok) for r in rows] == [("endpoint", False), ("credentials", True)]
    assert (
        rows[0].detail.startswith("cannot reach http://127.0.0.1:")
        and "check S3_ENDPOINT_URL" in rows[0].detail
    )

    monkeypatch.setenv("S3_ENDPOINT_URL", s3_server)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    rows = check_bucket(config.data)
    assert (rows[1].name, rows[1].ok) == ("credentials", False) and "AWS_ACCESS_KEY_ID" in rows[1].detail


def test_unreachable_endpoint_while_listing_is_named(s3_server, monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(  # an outage, exit 1 (not a user error): the message still names the endpoint
        StorageUnavailable, match=r"cannot list s3://any/: cannot reach the S3 endpoint http://127\.0\.0\.1:"
    ):
        list_files("s3://any/", retries=0)


def test_download_cache_is_keyed_by_url_and_etag(s3_server, tmp_path):
    make_bucket(s3_server, "cached")
    fs = filesystem("s3://cached")
    fs.pipe("cached/a.bin", b"first")
    info = list_files("s3://cached/").files["a.bin"]
    path = local_copy(info, download_dir=tmp_path)
    assert path.read_bytes() == b"first" and local_copy(info, download_dir=tmp_path) == path
    fs.pipe("cached/a.bin", b"second!")
    changed = list_files("s3://cached/").files["a.bin"]
    assert changed.fingerprint != info.fingerprint
    assert local_copy(changed, download_dir=tmp_path).read_bytes() == b"second!"
