"""Fixtures shared by the test modules (a local Hub-API server and a client pointed at it, a local S3 server), and how
the suite exits."""

import os
import shutil
import sys
import tempfile

import pytest
from hub_server import TEST_TOKEN, start_hub_server
from huggingface_hub import HfApi, constants
from local_cluster import S3Server

EXIT_STATUS = pytest.StashKey[int]()
RAY_TMPDIR = pytest.StashKey[str]()


def pytest_configure(config):
    """The suite runs on two xdist workers (`-n 2` in pyproject.toml), one per core of a 2-core CI machine:
    - each worker and the processes it starts compute on one thread: two OpenMP threads per process, with the
      other worker busy, spin at every barrier (a tiny training run next to two busy processes: 150 s, 13 s
      with one thread);
    - each worker gets a Ray temp dir of its own: a bare `ray.init()` joins the newest cluster recorded in
      RAY_TMPDIR, and must not join the other worker's."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # torch is not imported yet: it reads this when it is
        config.stash[RAY_TMPDIR] = os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix=f"ray-{worker}-")


def pytest_collection_modifyitems(config, items):
    """Files with slow tests first, the others after them in their order: `--dist loadfile` hands files to the
    workers in this order, so the long cluster files start early and the short ones fill in at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture
def lfs_not_xet(monkeypatch):
    """An in-process client must upload through LFS: the test server does not speak Xet."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


@pytest.fixture
def hub(tmp_path):
    server = start_hub_server(tmp_path / "hub")
    yield server
    server.stop()


@pytest.fixture
def api(hub):
    return HfApi(endpoint=hub.endpoint, token=TEST_TOKEN)


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server (real HTTP) with one empty bucket, its endpoint and keys in the environment."""
    server = S3Server().start()
    yield server
    server.stop()


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave with pytest's own exit status, skipping interpreter teardown: native threads of Ray's and gRPC's
    clients can crash it after every test has passed (seen once: 473 passed, then exit code 139). Every Ray
    instance and server the tests start is stopped by its fixture before this point, and an xdist worker has sent
    its results (execnet writes them synchronously)."""
    if RAY_TMPDIR in config.stash:
        shutil.rmtree(config.stash[RAY_TMPDIR], ignore_errors=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(config.stash.get(EXIT_STATUS, 0))
