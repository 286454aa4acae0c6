"""Start a stage in its own session and kill it for real: every process of the session.

Ray's raylet starts each worker in a process group of its own (pgid = its pid), so
``os.killpg`` on the stage's group misses the workers; the session (``setsid``, from
``start_new_session=True``) holds them all, as a container or a systemd unit would.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from pipelines.common import storage
from tests.project import project_env

# Pauses a stage for ever right after its N-th storage.write_bytes into its output, counted
# over the driver and its Ray workers (pause_hook/sitecustomize.py), the count kept in a marker
# file and the pause flagged in ``<marker>.paused``: the kill then lands at an exact point of
# the output phase.
PAUSE_HOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pause_hook")


def start_stage(project: str, stage: str, log_path: str, pause_after_write: int | None = None,
                marker: str | None = None, out_dir: str | None = None) -> subprocess.Popen:
    """``python -m stages.<stage>`` in a new session, paused after its ``pause_after_write``-th
    file write into ``out_dir`` when given."""
    env = project_env()
    if pause_after_write is not None:
        env["PYTHONPATH"] = os.pathsep.join([PAUSE_HOOK, project, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["RELIABILITY_PAUSE_AFTER_WRITE"] = f"{pause_after_write}:{marker}:{out_dir}"
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", f"stages.{stage}"], cwd=project, env=env,
                                start_new_session=True, stdout=log, stderr=subprocess.STDOUT)


def session_processes(sid: int) -> list[psutil.Process]:
    """Live processes of session ``sid`` (the stage and everything Ray started for it)."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(proc.pid) == sid:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def signal_session(sid: int, sig: int) -> int:
    """Send ``sig`` to every process of the session; returns how many got it."""
    sent = 0
    for proc in session_processes(sid):
        try:
            proc.send_signal(sig)
            sent += 1
        except psutil.Error:
            continue
    return sent


def kill(proc: subprocess.Popen, sig: int, grace_s: float = 60) -> dict:
    """Deliver ``sig`` to the stage's whole session. After SIGTERM the stage gets ``grace_s``
    to exit (as an orchestrator would allow) before SIGKILL; then wait until no process of
    the session is left, so nothing can still write when the caller looks at the output."""
    sid = proc.pid
    was_running = proc.poll() is None
    signal_session(sid, sig)
    exited_in_grace = None
    if sig != signal.SIGKILL:
        try:
            proc.wait(timeout=grace_s)
            exited_in_grace = True
        except subprocess.TimeoutExpired:
            exited_in_grace = False
    deadline = time.time() + 60
    while session_processes(sid) and time.time() < deadline:
        signal_session(sid, signal.SIGKILL)
        time.sleep(0.2)
    proc.wait(timeout=30)
    left = session_processes(sid)
    assert not left, f"processes of the killed stage survived: {[p.pid for p in left]}"
    return {"was_running": was_running, "exited_in_grace": exited_in_grace, "returncode": proc.returncode}


def wait_for(predicate, proc: subprocess.Popen, timeout: float, poll_s: float = 0.02) -> bool:
    """Poll ``predicate`` until it holds (True) or the process exits / time runs out (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(poll_s)
    return False


def log_tail(path: str, chars: int = 4000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""


def committed_step(checkpoint_dir: str) -> int:
    """The latest checkpoint step Ray Train committed under a checkpoint_dir, local or
    s3:// (0: none yet): what its checkpoint_manager_snapshot.json names."""
    snapshots = [p for p in storage.list_files(checkpoint_dir) if p.endswith("checkpoint_manager_snapshot.json")]
    for path in snapshots:
        try:
            latest = storage.read_json(path).get("latest_checkpoint_result")
        except (OSError, ValueError):  # not written yet, or being replaced
            continue
        if latest:
            return int(latest["metrics"]["step"])
    return 0
