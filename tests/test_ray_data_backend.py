"""The `ray_data` backend on a real 2-node local Ray cluster: the Train workers live on a node without CPUs for
Ray Data (they need its custom resource), so every decoding and augmentation task runs on the other node."""

import json
import os
import sys
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from twist_hf.training.launch import RAY_TRAIN_ENV

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
from ingest_data import write_image_folder
from pretrain import main
from tiny_run import tiny_run_args

STORE = 256 * 1024**2


@pytest.fixture(scope="module")
def two_node_cluster():
    """Head: 0 CPUs and 2 `trainer` slots (the Train workers); second node: 2 CPUs (Ray Data's tasks)."""
    for key, value in RAY_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    temp_dir = Path("/tmp/ray-backends") / f"two-node-{os.getpid()}"
    temp_dir.mkdir(parents=True, exist_ok=True)
    (Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray").mkdir(parents=True, exist_ok=True)  # Ray's address file
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "resources": {"trainer": 2},
            "object_store_memory": STORE,
            "temp_dir": str(temp_dir),
        },
    )
    data_node = cluster.add_node(num_cpus=2, object_store_memory=STORE)
    ray.init(address=cluster.address, runtime_env={"env_vars": {key: os.environ[key] for key in RAY_TRAIN_ENV}})
    yield cluster.head_node.node_id, data_node.node_id
    ray.shutdown()
    cluster.shutdown()


def actors_nodes(name_part: str) -> set[str]:
    """The nodes that ran the actors whose class name contains `name_part` (never-placed ones left out)."""
    from ray.util.state import list_actors

    actors = list_actors(limit=1000, detail=True)
    return {actor.node_id for actor in actors if name_part in actor.class_name and actor.node_id is not None}


def test_augmentation_runs_on_the_node_without_train_workers(two_node_cluster, tmp_path):
    head, data_node = two_node_cluster
    folder = write_image_folder(tmp_path / "images", {"train": 64, "test": 16})
    output = tmp_path / "run"
    options = tiny_run_args(
        launcher="ray",
        num_workers=2,
        resources_per_worker=json.dumps({"CPU": 0, "trainer": 1}),
        dataset_name="imagefolder",
        data_dir=folder,
        augmentation_backend="ray_data",
        per_device_train_batch_size=8,
        bunch_size=16,
        max_train_samples=64,
        max_eval_samples=16,
        max_steps=6,
        save_strategy="no",
        logging_steps=2,
    )
    assert main([*options, "--output_dir", str(output)]) == 0
    results = json.loads((output / "all_results.json").read_text())
    assert results["status"] == "completed" and results["global_step"] == 6
    assert actors_nodes("MapWorker") == {data_node}
    assert actors_nodes("RayTrainWorker") == {head}
