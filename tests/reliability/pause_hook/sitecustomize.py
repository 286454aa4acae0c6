"""Pauses a stage right after the N-th file it writes, in whichever process writes it: the
driver or a Ray worker (stages write their outputs from tasks too). Python imports this
module at start-up when its folder leads PYTHONPATH; tests/reliability/processes.py puts it
there, with RELIABILITY_PAUSE_AFTER_WRITE="N:marker", for the stage and every Ray process
it starts. Every file a stage writes goes through pipelines.common.storage.write_bytes."""
import os

_SPEC = os.environ.get("RELIABILITY_PAUSE_AFTER_WRITE")


def _install(pause_after: int, marker: str) -> None:
    import fcntl
    import time

    from pipelines.common import storage

    real_write_bytes = storage.write_bytes

    def write_bytes(path, data, *args, **kwargs):
        real_write_bytes(path, data, *args, **kwargs)
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
            time.sleep(3600)

    storage.write_bytes = write_bytes


if _SPEC:
    _count, _marker = _SPEC.split(":", 1)
    try:
        _install(int(_count), _marker)
    except ImportError:  # a Ray daemon started outside the project: it writes no stage file
        pass
