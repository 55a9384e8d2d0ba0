"""A preprocess killed with SIGKILL resumes from its journal, and its pool workers die with it."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from medctl.config import load_config
from medctl.data.preprocess import JOURNAL, cache_dir_for, preprocess
from medctl.data.synthetic import make_synthetic_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """40 NRRD volumes, enough work that a kill lands mid-run."""
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("resume"), n=40, size=(16, 48, 48), n_excluded=0, seed=3
    )


def overrides(ds, cache: Path) -> list[str]:
    return [
        *ds.config_overrides(),
        'data.source.mask_root=""',
        f"data.cache_dir={json.dumps(str(cache))}",
        "data.preprocess.spatial_size=[8, 24, 24]",
    ]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def journal_lines(cache: Path) -> int:
    path = cache / JOURNAL
    return path.read_text().count("\n") if path.is_file() else 0


def test_a_killed_preprocess_resumes_and_ends_bit_identical(dataset, tmp_path, caplog):
    killed_cfg = load_config(None, overrides(dataset, tmp_path / "killed"), env={})
    cache = cache_dir_for(killed_cfg.data)
    env = {**os.environ, "MEDCTL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "medctl",
        "preprocess",
        "--workers",
        "1",
        *overrides(dataset, tmp_path / "killed"),
    ]
    run = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: journal_lines(cache) >= 5 or run.poll() is not None, 600, "5 journalled samples")
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    done = journal_lines(cache)
    assert run.returncode == -signal.SIGKILL and 5 <= done < 40, "the kill came too late to test a resume"
    assert not (cache / "manifest.parquet").exists()  # nothing but the journal recorded the work

    with caplog.at_level(logging.INFO, logger="medctl"):
        resumed = preprocess(killed_cfg.data, workers=1)
    assert (
        f"resuming an interrupted run: {done} samples done, only the {40 - done} missing run" in caplog.text
    )
    assert resumed.n_new + resumed.n_cached == 40 and resumed.n_cached >= done  # only the missing ran
    assert not (cache / JOURNAL).exists()

    whole = preprocess(load_config(None, overrides(dataset, tmp_path / "whole"), env={}).data, workers=1)
    assert whole.n_new == 40
    for id_ in whole.manifest["id"]:
        name = f"images/{id_}.npy"
        assert (resumed.cache_dir / name).read_bytes() == (whole.cache_dir / name).read_bytes(), id_
    pd.testing.assert_frame_equal(resumed.manifest, whole.manifest)
    assert (resumed.cache_dir / "data_errors.csv").read_bytes() == (
        whole.cache_dir / "data_errors.csv"
    ).read_bytes()
    assert sorted(p.name for p in (resumed.cache_dir / "images").glob("*.npy")) == sorted(
        p.name for p in (whole.cache_dir / "images").glob("*.npy")
    )


POOL_SCRIPT = textwrap.dedent(
    """
    import os, time
    from concurrent.futures import ProcessPoolExecutor
    from medctl.data.preprocess import _init_worker, _pool_context

    if __name__ == "__main__":
        pool = ProcessPoolExecutor(2, mp_context=_pool_context(), initializer=_init_worker, initargs=(os.getpid(),))
        started = [pool.submit(time.sleep, 0.5) for _ in range(2)]
        [f.result() for f in started]
        for _ in range(4):
            pool.submit(time.sleep, 120)  # busy workers, as in the middle of a 512^3 volume
        print(" ".join(str(p.pid) for p in pool._processes.values()), flush=True)
        time.sleep(600)
    """
)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its reaping is left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_pool_workers_exit_when_the_parent_is_killed():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, "-c", POOL_SCRIPT], env=env, stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
        assert len(workers) == 2 and all(alive(p) for p in workers)
    finally:
        parent.kill()  # SIGKILL: no atexit, no pool shutdown
        parent.wait()
    deadline = time.monotonic() + 5
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in workers if alive(p)], "a worker outlived its parent"
