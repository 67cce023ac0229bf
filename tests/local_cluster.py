"""Real parts for the cluster tests: a multi-node Ray cluster on this machine (Ray's `cluster_utils.Cluster`:
one raylet per node, each with its own CPUs, in a temp dir of its own so no other `ray.init()` joins it), an
S3 API server on loopback (moto's server mode, real HTTP), and `recipes/pretrain.py` run as a user would."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tiny_run import PRETRAIN_SCRIPT, ROOT

BUCKET = "twist-checkpoints"
# Rank 0's line "rank 0 runs on node <ip> <node id> (pid <pid>); rank 1 runs on node ..." (launch.worker_placement).
PLACEMENT = re.compile(r"rank (\d+) runs on node \S+ (\w+) \(pid (\d+)\)")
# The cluster marks a killed node dead after ~1.5 s (3 missed 0.5 s health checks) instead of ~15 s.
FAST_NODE_DEATH = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class S3Server:
    """moto's S3 server on a free loopback port, configured the standard AWS way through the environment
    (which the cluster's raylets and the drivers inherit), with one empty bucket."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per HTTP request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.env = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self.saved_env = {key: os.environ.get(key) for key in self.env}

    def start(self) -> S3Server:
        self.server.start()
        os.environ.update(self.env)
        self.client().create_bucket(Bucket=BUCKET)
        return self

    def stop(self) -> None:
        self.server.stop()
        for key, value in self.saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"])

    def keys(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


class LocalCluster:
    """A head without CPUs (it never hosts a worker, so killing a worker node never kills the cluster) and
    `worker_nodes` nodes of `cpus_per_node` CPUs, nodes declared dead fast. Everything lives in a fresh temp dir,
    RAY_TMPDIR included while it runs: Ray records the newest cluster's address there, and a bare `ray.init()`
    elsewhere on the machine must not find it."""

    def __init__(self, worker_nodes: int, cpus_per_node: int):
        from ray.cluster_utils import Cluster

        self.temp_dir = tempfile.mkdtemp(prefix="ray-cluster-test-")
        self.saved_tmpdir = os.environ.get("RAY_TMPDIR")
        os.environ["RAY_TMPDIR"] = self.temp_dir
        os.makedirs(os.path.join(self.temp_dir, "ray"))
        self.cpus_per_node = cpus_per_node
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "include_dashboard": False,
                "dashboard_port": free_port(),
                "_system_config": FAST_NODE_DEATH,
            },
        )
        for _ in range(worker_nodes):
            self.add_node()
        self.cluster.wait_for_nodes()

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_node(self):
        return self.cluster.add_node(num_cpus=self.cpus_per_node)

    def kill_node(self, node_id_prefix: str) -> None:
        """SIGKILL a worker node's raylet and every process of it (its Ray workers die with it)."""
        node = next(node for node in self.cluster.worker_nodes if node.node_id.startswith(node_id_prefix))
        self.cluster.remove_node(node, allow_graceful=False)

    def shutdown(self) -> None:
        self.cluster.shutdown()
        if self.saved_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = self.saved_tmpdir
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class Driver:
    """`recipes/pretrain.py` (or another script) in its own process against the cluster; its output is
    collected line by line with the time each line arrived."""

    def __init__(self, args: list[str], script: Path = PRETRAIN_SCRIPT):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, str(script), *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait(self, timeout: float = 300) -> int:
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        self.reader.join(timeout=5)
        return code

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def placements(self) -> list[tuple[float, dict[int, str]]]:
        """(time, {rank: node id}) for each start of the worker group, from rank 0's placement log line."""
        return [
            (arrived, {int(rank): node for rank, node, _ in PLACEMENT.findall(line)})
            for arrived, line in self.placement_lines()
        ]

    def worker_pids(self) -> dict[int, int]:
        """{rank: process id} of the newest start of the worker group."""
        _, line = self.placement_lines()[-1]
        return {int(rank): int(pid) for rank, _, pid in PLACEMENT.findall(line)}

    def placement_lines(self) -> list[tuple[float, str]]:
        return self.lines_with("rank 0 runs on node")

    def lines_with(self, *markers: str) -> list[tuple[float, str]]:
        """(time, line) of each output line that contains any of `markers`."""
        return [(arrived, line) for arrived, line in self.lines if any(marker in line for marker in markers)]
