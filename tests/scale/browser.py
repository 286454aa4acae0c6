"""Load a page in real headless Chromium and report what a person would notice.

Chromium is driven through the DevTools protocol over a pipe (--remote-debugging-pipe:
NUL-separated JSON on fds 3 and 4), so no port is opened and no extra package is
needed. The result lists console errors, uncaught exceptions, every request the page
made, and the value of a JavaScript expression evaluated after the load event.
"""
from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--no-default-browser-check",
                  "--disable-extensions", "--disable-sync", "--remote-debugging-pipe"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _high_fd(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class _Pipe:
    """The DevTools protocol over Chromium's fds 3 (commands in) and 4 (replies and events out)."""

    def __init__(self, proc: subprocess.Popen, to_browser: int, from_browser: int):
        self.proc, self.out, self.inp = proc, to_browser, from_browser
        self.buffer, self.next_id, self.events = b"", 0, []

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60.0) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.out, json.dumps(message).encode() + b"\0")
        while True:
            reply = self.receive(timeout)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def wait_for(self, method: str, timeout: float = 60.0) -> dict:
        while True:
            for event in self.events:
                if event.get("method") == method:
                    return event
            self.receive(timeout)

    def receive(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.inp], [], [], max(left, 0))
            if not ready:
                raise TimeoutError(f"no reply from chromium within {timeout}s")
            chunk = os.read(self.inp, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium closed the pipe (exit {self.proc.poll()})")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        message = json.loads(raw)
        if "method" in message:
            self.events.append(message)
        return message


def load_page(path: str, expression: str, timeout: float = 90.0) -> dict:
    """Open ``path`` (file) and return {"console_errors", "exceptions", "requests", "value"}."""
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    # both pipes moved above fd 10, so the child's dup2 onto 3 and 4 cannot clobber one of them
    to_browser_r, to_browser_w, from_browser_r, from_browser_w = (
        _high_fd(fd) for pair in (os.pipe(), os.pipe()) for fd in pair)

    def wire_fds():  # in the child, before exec: the protocol fds must be 3 and 4
        os.dup2(to_browser_r, 3)
        os.dup2(from_browser_w, 4)

    proc = subprocess.Popen([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            preexec_fn=wire_fds, pass_fds=(3, 4), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.close(to_browser_r)
    os.close(from_browser_w)
    pipe = _Pipe(proc, to_browser_w, from_browser_r)
    try:
        target = pipe.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
        session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            pipe.send(f"{domain}.enable", session=session)
        pipe.send("Page.navigate", {"url": "file://" + os.path.abspath(path)}, session=session)
        pipe.wait_for("Page.loadEventFired", timeout)
        value = pipe.send("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                          session=session)["result"].get("value")
        events = [e for e in pipe.events if e.get("sessionId") == session]
        return {
            "console_errors": [e["params"] for e in events if e["method"] == "Runtime.consoleAPICalled"
                               and e["params"].get("type") in ("error", "assert")]
                              + [e["params"]["entry"] for e in events if e["method"] == "Log.entryAdded"
                                 and e["params"]["entry"].get("level") == "error"],
            "exceptions": [e["params"] for e in events if e["method"] == "Runtime.exceptionThrown"],
            "requests": [e["params"]["request"]["url"][:80] for e in events
                         if e["method"] == "Network.requestWillBeSent"],
            "value": value,
        }
    finally:
        try:
            pipe.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(to_browser_w)
        os.close(from_browser_r)
        shutil.rmtree(profile, ignore_errors=True)
