"""A real multi-node Ray cluster on this machine, on loopback only, for the scale tests.

`ray start` cannot put a second node on 127.0.0.1 (it swaps loopback for the machine's
routable address), so the nodes are started with ``ray.cluster_utils.Cluster``: a head and
worker nodes, each its own raylet and object store, as separate processes. It runs in a
child process (``python -m tests.scale.ray_cluster``) with its own RAY_TMPDIR, so other
Ray instances on the machine neither see it nor get joined to it by ``ray.init()``, and it
is stopped by that child's PID (SIGTERM -> Cluster.shutdown, which kills every node).
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class ClusterInfo:
    address: str        # GCS host:port, for RayConfig(address=...) / ray.init(address=...)
    dashboard: str      # http://127.0.0.1:port (state API, Ray Jobs)
    nodes: int
    env: dict           # environment a driver needs to join over loopback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env(temp_dir: str) -> dict:
    """Variables for the cluster and its drivers. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray
    resolve "this node" to 127.0.0.1 instead of the routable address, so nothing leaves loopback."""
    return {"RAY_TMPDIR": temp_dir, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "120"}


@contextlib.contextmanager
def ray_cluster(worker_nodes: int = 1, cpus_per_node: int = 2, timeout: float = 240.0):
    """Start a head + ``worker_nodes`` nodes; yield :class:`ClusterInfo`; stop them by PID."""
    temp_dir = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, **cluster_env(temp_dir), "PYTHONPATH": PROJECT_ROOT}
    with open(os.path.join(temp_dir, "cluster.log"), "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.scale.ray_cluster", str(worker_nodes), str(cpus_per_node)],
            cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        info = _read_info(proc, timeout, temp_dir)
        yield ClusterInfo(address=info["address"], dashboard=info["dashboard"], nodes=info["nodes"],
                          env=cluster_env(temp_dir))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _read_info(proc: subprocess.Popen, timeout: float, temp_dir: str) -> dict:
    """The one JSON line the child prints once every node is up."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        log = open(os.path.join(temp_dir, "cluster.log")).read()[-4000:]
        raise RuntimeError(f"the Ray cluster did not start within {timeout}s (exit {proc.poll()}):\n{log}")
    return json.loads(line)


def serve(worker_nodes: int, cpus_per_node: int) -> None:
    """Child process: start the nodes, print their address, run until SIGTERM."""
    from ray.cluster_utils import Cluster

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    node = {"num_cpus": cpus_per_node, "node_ip_address": "127.0.0.1",
            "object_store_memory": 256 * 1024 * 1024}
    dashboard_port = free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        **node, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port,
        "ray_client_server_port": free_port()})
    try:
        for _ in range(worker_nodes):
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        print(json.dumps({"address": cluster.address, "dashboard": f"http://127.0.0.1:{dashboard_port}",
                          "nodes": 1 + worker_nodes}), flush=True)
        while True:
            time.sleep(3600)
    finally:  # no graceful drain: nothing of value runs on a test cluster when it is stopped
        for node in list(cluster.worker_nodes):
            cluster.remove_node(node, allow_graceful=False)
        cluster.remove_node(cluster.head_node, allow_graceful=False)


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
