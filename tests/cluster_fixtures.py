"""A multi-node Ray cluster on this machine for the elastic tests: Ray's `cluster_utils.Cluster` (one raylet per
node, each with its own CPUs), in a temp dir of its own under /tmp/ray-elastic so that no other `ray.init()`
joins it, with nodes declared dead within ~1.5 s of being killed (the default is ~15 s)."""

from __future__ import annotations

import os
import shutil
import tempfile

# 3 missed health checks 0.5 s apart (Ray's default: 3 x 5 s, after a 5 s initial delay).
FAST_NODE_DEATH = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}
TEMP_ROOT = "/tmp/ray-elastic"


class LocalCluster:
    """A head without CPUs (it never hosts a worker, so killing a worker node never kills the cluster) and
    `worker_nodes` nodes of `cpus_per_node` CPUs. `env` is what a driver process needs to join it alone."""

    def __init__(self, worker_nodes: int, cpus_per_node: int):
        from ray.cluster_utils import Cluster

        os.makedirs(TEMP_ROOT, exist_ok=True)
        self.temp_dir = tempfile.mkdtemp(prefix="c-", dir=TEMP_ROOT)
        self.saved_tmpdir = os.environ.get("RAY_TMPDIR")
        # Ray writes the newest cluster's address under RAY_TMPDIR: keep it inside this cluster's folder.
        os.environ["RAY_TMPDIR"] = self.temp_dir
        os.makedirs(os.path.join(self.temp_dir, "ray"))
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "include_dashboard": False,
                "temp_dir": self.temp_dir,
                "_system_config": FAST_NODE_DEATH,
            },
        )
        for _ in range(worker_nodes):
            self.cluster.add_node(num_cpus=cpus_per_node, temp_dir=self.temp_dir)
        self.cluster.wait_for_nodes()

    @property
    def address(self) -> str:
        return self.cluster.address

    @property
    def env(self) -> dict:
        return {**os.environ, "RAY_TMPDIR": self.temp_dir, "RAY_ADDRESS": self.address}

    def kill_a_worker_node(self) -> None:
        """SIGKILL one worker node's raylet and every process of it, as when a machine disappears."""
        self.cluster.remove_node(next(iter(self.cluster.worker_nodes)), allow_graceful=False)

    def shutdown(self) -> None:
        self.cluster.shutdown()
        if self.saved_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = self.saved_tmpdir
        shutil.rmtree(self.temp_dir, ignore_errors=True)
