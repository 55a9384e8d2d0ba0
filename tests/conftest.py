"""Shared fixtures: a seed, and no stray MEDCTL_* or AWS variables leaking in from the shell."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("MEDCTL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MEDCTL_NO_PROGRESS", "1")


@pytest.fixture
def seed() -> int:
    torch.manual_seed(0)
    np.random.seed(0)
    return 0


# ------------------------------------------------------------------------------------- data fixtures
# Synthetic datasets (medctl.data.synthetic) shared by every area's tests. Session-scoped: generate
# once, then `load_config(None, synthetic_3d.config_overrides())` points a Config at one (its cache
# lives in <root>/cache, so `preprocess` runs once per settings for the whole session).
@pytest.fixture(scope="session")
def synthetic_3d(tmp_path_factory):
    """24 NRRD volumes (16, 32, 32), spacing (2, 1, 1), healthy/edema lesions + masks; 22 pass the filter."""
    from medctl.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic_3d"), n=24, dims=3, size=(16, 32, 32), seed=0)


@pytest.fixture(scope="session")
def synthetic_2d(tmp_path_factory):
    """24 PNG images (32, 32), uint8, healthy/edema lesions + PNG masks; 22 pass the filter."""
    from medctl.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic_2d"), n=24, dims=2, size=(32, 32), seed=1)


@pytest.fixture(scope="session")
def tiny_byol() -> list[str]:
    """Overrides for a BYOL pretraining of a tiny mt3 in seconds (on the synthetic 3D volumes, cached small)."""
    return [
        "data.preprocess.spatial_size=[8, 16, 16]", "data.batch_size=4", "pretrain.monitor_samples=8",
        'pretrain.method="byol"', 'model.encoder="mt3_tiny"',
        "model.encoder_args={stem_channels=[4, 8], embed_dim=32, depth=1, num_heads=2}",
        "pretrain.byol.projector_dim=16", "pretrain.byol.projector_hidden=32", "pretrain.byol.jigsaw_permutations=4",
        "pretrain.warmup_epochs=0", "data.preprocess.workers=1",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def _moto_endpoint():
    """One moto S3 server on 127.0.0.1 at a free port for the session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_server(_moto_endpoint, monkeypatch):
    """The moto endpoint URL, with S3_ENDPOINT_URL, region us-east-1 and "testing" credentials set.

    Buckets persist for the session: create uniquely named ones (e.g. from the test name).
    """
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("S3_ENDPOINT_URL", _moto_endpoint)
    return _moto_endpoint


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def flaky_endpoint(monkeypatch):
    """A moto server of this test's own (the session's must stay up), and a way to stop and restart it."""
    port = free_port()
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    from moto.server import ThreadedMotoServer

    servers = [ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)]
    servers[0].start()

    class Endpoint:
        url = f"http://127.0.0.1:{port}"

        def stop(self):
            servers[-1].stop()

        def restart(self):  # moto keeps its buckets in this process: they come back with the server
            servers.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
            servers[-1].start()

    yield Endpoint()
    servers[-1].stop()
