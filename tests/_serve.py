"""`genserve serve` as a process, for the tests that signal, kill and restart it."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


_profile: list[str] = []
_profile_lock = threading.Lock()


def tiny_profile() -> str:
    """A latency profile of the tiny presets measured on 2 CPU workers, once per test session
    (`genserve profile`, what `--profile measure` does at every start: ~10 s saved a start)."""
    with _profile_lock:
        if not _profile:
            d = tempfile.mkdtemp(prefix="genserve-profile-")
            atexit.register(shutil.rmtree, d, True)
            subprocess.run([sys.executable, "-m", "genserve.cli", "profile", "--models",
                            "tiny-t2i,tiny-t2v", "--out", d, "--batches", "1,2,4", "--reps", "3",
                            "--workers", "2"], cwd=ROOT, check=True, capture_output=True,
                           timeout=300)
            _profile.append(d)
        return _profile[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`genserve serve` on a free port with 2 CPU workers; in a session of its own, so that
    `crash` can take it down with its workers at once, as a lost machine would."""

    def __init__(self, tmp_path: Path, *args: str, log_name: str = "serve.log"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.results = tmp_path / "results"
        self.log = tmp_path / log_name
        if "--profile" not in args:
            args = ("--profile", tiny_profile(), *args)
        cmd = [sys.executable, "-m", "genserve.cli", "serve", "--port", str(self.port),
               "--workers", "2", "--results-dir", str(self.results), *args]
        with open(self.log, "wb") as log:  # a file, not a pipe: nobody has to drain it
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                         start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, f"serve exited early:\n{self.output()}"
            assert time.monotonic() < deadline, f"serve did not start:\n{self.output()}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def workers(self) -> list[int]:
        """The server's child processes (its workers, multiprocessing's helpers)."""
        kids = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                if ppid == self.proc.pid:
                    kids.append(int(d.name))
        return kids

    def crash(self) -> None:
        """SIGKILL the server and every process of its session (its workers)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def close(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.crash()


class Uvicorn:
    """An app under uvicorn in a thread, on a free loopback port; `ready` says when it answers
    (the port accepts and, for a started service, /health is 200)."""

    def __init__(self, app, health: bool = False, **config):
        import uvicorn

        self.app, self.svc, self.health = app, app.state.service, health
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="critical", **config))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.thread.is_alive(), "the server thread died while starting"
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                if not self.health or r.status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.__exit__()
        raise AssertionError("the server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def assert_error(r, status: int, param: str | None = "<any>", code: str | None = None) -> dict:
    """An OpenAI-style JSON error body with this status (and param / code when given)."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param != "<any>":
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err
