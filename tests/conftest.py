"""Fixtures shared by the test modules (a local Hub-API server and a client pointed at it, a local S3 server), and how
the suite exits."""

import os
import sys

import pytest
from hub_server import TEST_TOKEN, start_hub_server
from huggingface_hub import HfApi, constants
from local_cluster import S3Server

EXIT_STATUS = pytest.StashKey[int]()


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
    instance and server the tests start is stopped by its fixture before this point."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(config.stash.get(EXIT_STATUS, 0))
