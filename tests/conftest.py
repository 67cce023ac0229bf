"""Fixtures shared by the Hub tests (a local Hub-API server and a client pointed at it), and the rule that keeps
Ray tests apart from each other under pytest-xdist."""

import os
import tempfile

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


# The long Ray modules, in two groups of about equal time: each group runs one test after another in one xdist
# worker (they share module-scoped clusters), the two groups side by side.
RAY_GROUPS = {
    "test_cluster": "ray-a",
    "test_training_ray": "ray-a",
    "test_ray_data_backend": "ray-a",
    "test_tune": "ray-b",
    "test_elastic": "ray-b",
}


def pytest_configure(config):
    """Each xdist worker keeps its Ray instances under a temp dir of its own: a bare `ray.init()` joins the newest
    Ray instance recorded under RAY_TMPDIR, and that must never be another worker's."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix=f"ray-{worker}-")


def pytest_collection_modifyitems(items):
    for item in items:
        group = RAY_GROUPS.get(item.module.__name__, "ray-b" if item.get_closest_marker("starts_ray") else None)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
