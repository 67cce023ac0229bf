"""Fixtures shared by the Hub tests: a local Hub-API server and a client pointed at it."""

import pytest
from hub_server import TEST_TOKEN, start_hub_server
from huggingface_hub import HfApi, constants


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
