"""Pauses a stage right after the N-th file it writes into its output, in whichever process
writes it: the driver or a Ray worker (stages write their outputs from tasks too). Python
imports this module at start-up when its folder leads PYTHONPATH; tests/reliability/processes.py
puts it there, with RELIABILITY_PAUSE_AFTER_WRITE="N:marker:out_dir", for the stage and every
Ray process it starts. Every file a stage writes goes through pipelines.common.storage.write_bytes;
only those under out_dir or its staging dir (``<out_dir>.tmp-<hex>``) count, not work folders
(``<out_dir>.tmp-<hex>-work``) or metrics, so N ranges over the output's files."""
import os

_SPEC = os.environ.get("RELIABILITY_PAUSE_AFTER_WRITE")


def _is_output(path: str, out_dir: str) -> bool:
    path = os.path.abspath(path)
    rest = path[len(out_dir):] if path.startswith(out_dir) else ""
    if rest.startswith(os.sep):
        return True
    return rest.startswith(".tmp-") and not rest.split(os.sep, 1)[0].endswith("-work")


def _install(pause_after: int, marker: str, out_dir: str) -> None:
    import fcntl
    import time

    from pipelines.common import storage

    real_write_bytes = storage.write_bytes

    def write_bytes(path, data, *args, **kwargs):
        real_write_bytes(path, data, *args, **kwargs)
        if not _is_output(path, out_dir):
            return
        with open(marker + ".lock", "a") as lock:  # one count across processes
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with open(marker) as f:
                    count = int(f.read() or 0) + 1
            except OSError:
                count = 1
            with open(marker + ".tmp", "w") as f:
                f.write(str(count))
            os.replace(marker + ".tmp", marker)
        if count == pause_after:
            # its own flag: other processes may write on (the count passes N) while this one waits
            with open(marker + ".paused.tmp", "w") as f:
                f.write(str(count))
            os.replace(marker + ".paused.tmp", marker + ".paused")
            time.sleep(3600)

    storage.write_bytes = write_bytes


if _SPEC:
    _count, _marker, _out_dir = _SPEC.split(":", 2)
    try:
        _install(int(_count), _marker, os.path.abspath(_out_dir))
    except ImportError:  # a Ray daemon started outside the project: it writes no stage file
        pass
