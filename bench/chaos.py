"""Chaos: a mixed load through the HTTP API while faults are injected; nothing accepted may be lost.

Each run starts `genserve serve` (tiny presets, CPU workers) as a process in a session of its own,
sends videos (async) and images (blocking, in client threads) with an `Idempotency-Key` each, and
injects one fault kind at random (seeded) moments:

  worker-kill   SIGKILL of a worker process
  worker-stop   SIGSTOP of a worker process (hung: the heartbeat watchdog must notice)
  server-kill   SIGKILL of the server and its workers, then a restart on the same results dir
  server-term   SIGTERM mid-load (drain timeout short), then a restart

A client does what a careful client does: on a connection error it retries the same request with
the same key once the server answers again.  At the end every accepted job is read back:

  accepted   the server answered with a job id
  completed  ended completed
  failed     ended failed, with its error code
  lost       accepted, then unknown (404) or never ended within the run's time limit

and the recovery time of each fault: from the fault until the server answers /health again and a
job has made progress since (or none is left to make any).  That is service, not repair: after a
worker fault the other worker goes on at once; the lost one is replaced within its detection time
(a SIGSTOP: --worker-timeout, 5 s here).  The goal is lost = 0 in every run.

    python bench/chaos.py [--runs-per-fault 1] [--faults worker-kill,...] [--seconds 40]
"""

from __future__ import annotations

import argparse
import collections
import os
import random
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
FAULTS = ("worker-kill", "worker-stop", "server-kill", "server-term")
FINAL = ("completed", "failed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """Every descendant process of `pid` (from /proc)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


class Server:
    def __init__(self, results: Path, port: int, log: Path):
        self.results, self.port, self.log = results, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        """Start and wait for /health; returns the seconds it took."""
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", "genserve.cli", "serve", "--port", str(self.port),
               "--workers", "2", "--results-dir", str(self.results), "--checkpoint-steps", "4",
               "--worker-timeout", "5", "--drain-timeout", "3", "--drain-linger", "0",
               "--max-waiting-videos", "64", "--log-level", "info"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        while not self.healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited: see {self.log}")
            if time.monotonic() - t0 > 180:
                raise RuntimeError(f"serve did not start: see {self.log}")
            time.sleep(0.1)
        return time.monotonic() - t0

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def workers(self) -> list[int]:
        return [] if self.proc is None else children(self.proc.pid)

    def kill_all(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)


class Client:
    """The load: submits, retries across outages with the same key, tracks every job."""

    def __init__(self, server: Server, rng: random.Random):
        self.server, self.rng = server, rng
        self.accepted: dict[str, str] = {}  # idempotency key -> job id
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def post(self, path: str, body: dict, key: str, timeout: float) -> dict | None:
        """POST until answered (retrying across outages with the same key)."""
        while not self.stop.is_set():
            try:
                r = httpx.post(self.server.url + path, json=body, timeout=timeout,
                               headers={"Idempotency-Key": key})
            except httpx.TransportError:
                time.sleep(0.5)
                continue
            if r.status_code == 200:
                return r.json()
            if r.status_code == 503:  # draining, or stopped under it: retry
                time.sleep(0.5)
                continue
            return None  # refused (429, 4xx): not accepted
        return None

    def video(self, i: int) -> None:
        key = f"vid-{i}"
        body = {"prompt": f"chaos video {i}", "size": "32x32", "frames": 9,
                "steps": self.rng.choice((8, 16, 32)), "seed": i}
        got = self.post("/v1/videos", body, key, 30)
        if got:
            with self.lock:
                self.accepted[key] = got["id"]

    def image(self, i: int) -> None:
        key = f"img-{i}"
        body = {"prompt": f"chaos image {i}", "size": "64x64", "steps": 8, "seed": i}
        got = self.post("/v1/images/generations", body, key, 120)
        if got:
            with self.lock:
                self.accepted[key] = got["id"]

    def run(self, seconds: float, rate: float) -> None:
        t_end, i = time.monotonic() + seconds, 0
        while time.monotonic() < t_end and not self.stop.is_set():
            fn = self.video if self.rng.random() < 0.4 else self.image
            t = threading.Thread(target=fn, args=(i,), daemon=True)
            t.start()
            self.threads.append(t)
            i += 1
            time.sleep(self.rng.expovariate(rate))


def progress(server: Server, ids: list[str]) -> tuple[int, int]:
    """(steps done over `ids`, how many of them have not ended); (-1, -1) while unreachable."""
    total = open_ = 0
    for j in ids:
        try:
            r = httpx.get(f"{server.url}/v1/jobs/{j}", timeout=5)
        except httpx.TransportError:
            return -1, -1
        if r.status_code == 200:
            total += r.json().get("steps_done", 0)
            open_ += r.json()["status"] not in FINAL
    return total, open_


def inject(kind: str, server: Server, rng: random.Random, client: Client) -> float:
    """One fault; returns the seconds until the server answered /health and a job progressed."""
    t0 = time.monotonic()
    before = progress(server, list(client.accepted.values()))[0]
    if kind in ("worker-kill", "worker-stop"):
        pids = server.workers()
        if not pids:
            return float("nan")
        os.kill(rng.choice(pids), signal.SIGKILL if kind == "worker-kill" else signal.SIGSTOP)
    elif kind == "server-kill":
        server.kill_all()
        server.start()
    else:
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(60)
        server.kill_all()  # anything it left behind (there should be nothing)
        server.start()
    while time.monotonic() - t0 < 120:
        done, open_ = progress(server, list(client.accepted.values()))
        if server.healthy() and (done > before or open_ == 0):  # nothing left to progress
            break
        time.sleep(0.2)
    return time.monotonic() - t0


def one_run(kind: str, seed: int, seconds: float, rate: float, faults: int) -> dict:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="genserve-chaos-") as d:
        server = Server(Path(d) / "results", free_port(), Path(d) / "serve.log")
        server.start()
        client = Client(server, rng)
        load = threading.Thread(target=client.run, args=(seconds, rate), daemon=True)
        load.start()
        recoveries = []
        for k in range(faults):
            time.sleep(rng.uniform(0.3, 1.0) * seconds / (faults + 1))
            recoveries.append(inject(kind, server, rng, client))
        load.join()
        for t in client.threads:
            t.join(180)
        outcome: collections.Counter = collections.Counter()
        reasons: collections.Counter = collections.Counter()
        deadline = time.monotonic() + 180
        for key, job in sorted(client.accepted.items()):
            while True:
                try:
                    r = httpx.get(f"{server.url}/v1/jobs/{job}", timeout=10)
                except httpx.TransportError:
                    r = None
                if r is not None and r.status_code == 404:
                    outcome["lost"] += 1
                    break
                if r is not None and r.status_code == 200 and r.json()["status"] in FINAL:
                    st = r.json()["status"]
                    outcome[st] += 1
                    if st == "failed":
                        reasons[(r.json().get("error") or {}).get("code", "?")] += 1
                    break
                if time.monotonic() > deadline:
                    outcome["lost"] += 1  # never ended
                    break
                time.sleep(0.2)
        client.stop.set()
        server.kill_all()
        leftover = [p for p in server.workers()]
    return {"fault": kind, "seed": seed, "accepted": len(client.accepted),
            "completed": outcome["completed"], "failed": outcome["failed"],
            "reasons": dict(reasons), "lost": outcome["lost"],
            "recovery_s": [round(x, 1) for x in recoveries], "leftover_procs": len(leftover)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faults", default=",".join(FAULTS))
    ap.add_argument("--runs-per-fault", type=int, default=1)
    ap.add_argument("--faults-per-run", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=40.0, help="of load per run")
    ap.add_argument("--rate", type=float, default=1.0, help="requests per second")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    kinds = [k.strip() for k in a.faults.split(",") if k.strip()]
    bad = [k for k in kinds if k not in FAULTS]
    if bad:
        ap.error(f"--faults: unknown {bad}; known: {', '.join(FAULTS)}")
    print(f"{'fault':12} {'seed':>4} {'accepted':>8} {'completed':>9} {'failed':>6} "
          f"{'lost':>4}  recovery (s)   failed reasons")
    total_lost = 0
    for kind in kinds:
        for r in range(a.runs_per_fault):
            res = one_run(kind, a.seed + r, a.seconds, a.rate, a.faults_per_run)
            total_lost += res["lost"]
            print(f"{kind:12} {res['seed']:>4} {res['accepted']:>8} {res['completed']:>9} "
                  f"{res['failed']:>6} {res['lost']:>4}  {str(res['recovery_s']):14} "
                  f"{res['reasons'] or '-'}", flush=True)
    print(f"lost in all runs: {total_lost} (goal 0)")
    return 0 if total_lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
