"""Real Ray clusters on this machine, on loopback only, for the scale tests.

:func:`ray_head` is a one-node cluster started the way an operator starts one (``ray start
--head``), for Ray Jobs. :func:`ray_cluster` is a multi-node cluster:

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
import urllib.request
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


class StartingCluster:
    """A cluster whose nodes are starting in the background; :meth:`ready` waits for them."""

    def __init__(self, proc: subprocess.Popen, temp_dir: str, timeout: float):
        self._proc, self._temp_dir, self._timeout = proc, temp_dir, timeout
        self._info: ClusterInfo | None = None

    def ready(self) -> ClusterInfo:
        if self._info is None:
            info = _read_info(self._proc, self._timeout, self._temp_dir)
            self._info = ClusterInfo(address=info["address"], dashboard=info["dashboard"], nodes=info["nodes"],
                                     env=cluster_env(self._temp_dir))
        return self._info


@contextlib.contextmanager
def ray_cluster(worker_nodes: int = 1, cpus_per_node: int = 2, timeout: float = 240.0):
    """Start a head + ``worker_nodes`` nodes in the background (other work can overlap their
    start-up); yield a :class:`StartingCluster`; stop them by PID."""
    temp_dir = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, **cluster_env(temp_dir), "PYTHONPATH": PROJECT_ROOT}
    with open(os.path.join(temp_dir, "cluster.log"), "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.scale.ray_cluster", str(worker_nodes), str(cpus_per_node)],
            cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        yield StartingCluster(proc, temp_dir, timeout)
    finally:
        _stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, cwd: str | None = None, timeout: float = 180.0):
    """``ray start --head --block`` on 127.0.0.1 with every port chosen free and its own temp
    dir; yield :class:`ClusterInfo`; stop it by the PID of that ``ray start`` (SIGTERM: it
    kills the raylet, GCS, dashboard and workers it started; never ``ray stop``, which would
    stop every Ray instance on the machine). Workers inherit ``cwd`` (default: the temp dir),
    where the relative paths of tasks resolve, as on a node whose shared folder is its cwd."""
    temp_dir = tempfile.mkdtemp(prefix="rh-", dir="/tmp")
    # the cluster's Python environment is this venv (its `dvc`, `python` for jobs' commands)
    venv_bin = os.path.dirname(sys.executable)
    env = {**os.environ, **cluster_env(temp_dir), "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
    env.pop("RAY_ADDRESS", None)
    port, dashboard_port = free_port(), free_port()
    ports = {f"--{name}": str(free_port()) for name in (
        "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port")}
    ray_exe = os.path.join(venv_bin, "ray")
    cmd = [ray_exe, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           f"--num-cpus={num_cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
           f"--object-store-memory={256 * 1024 * 1024}",
           *[f"{flag}={value}" for flag, value in ports.items()]]
    log = open(os.path.join(temp_dir, "head.log"), "w")
    proc = subprocess.Popen(cmd, cwd=cwd or temp_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_jobs_api(dashboard, proc, timeout, temp_dir)
        yield ClusterInfo(address=f"127.0.0.1:{port}", dashboard=dashboard, nodes=1, env=cluster_env(temp_dir))
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process (it stops the Ray processes it started), SIGKILL after 60 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_for_jobs_api(dashboard: str, proc: subprocess.Popen, timeout: float, temp_dir: str) -> None:
    """Until the head's Jobs API answers (the dashboard starts last)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{dashboard}/api/jobs/", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    log = open(os.path.join(temp_dir, "head.log")).read()[-4000:]
    raise RuntimeError(f"ray start --head did not serve its Jobs API within {timeout}s (exit {proc.poll()}):\n{log}")


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
