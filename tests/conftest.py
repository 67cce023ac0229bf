"""Fixtures shared by the Hub tests (a local Hub-API server and a client pointed at it), and the rule that keeps
Ray tests apart from each other under pytest-xdist."""

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


# Modules whose tests start Ray (a local instance or a multi-raylet cluster). They run one after another in one
# xdist worker: two Ray clusters at once on a 2-core machine starve each other's health checks.
RAY_MODULES = {"test_cluster", "test_elastic", "test_ray_data_backend", "test_training_ray", "test_tune"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__ in RAY_MODULES or item.get_closest_marker("starts_ray"):
            item.add_marker(pytest.mark.xdist_group("ray"))
