"""Worker processes: one per device, one torch.distributed world, groups made once at start-up.

The driver (the engine, or `genserve generate --sp K`) never loads the model: it sends jobs and
receives step states as bytes.  A job names its ranks (the GPU set; SP degree = its size), the
requests' states and the number of steps.  Every member of the group runs the same steps (the
transformer forward is sharded inside, see `sequence.py`); the first member sends back the new
states.  Since a state travels with each job, a request can run its next steps on any other set of
workers, of any size: that is the elastic re-sharding (via host memory, bytes = `StepState`).

Failures: a worker that raises sends the error back and stays up; a worker that dies is noticed by
the driver within `poll_s` and reported as `WorkerLost`, and the other workers stay usable for
groups that do not include it (gloo/NCCL collectives of a group with a dead member time out after
`collective_timeout_s`).
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta

from ..models.base import GenRequest, StepState


class WorkerError(RuntimeError):
    """A job failed inside a worker (the worker is still alive)."""


class WorkerLost(RuntimeError):
    """A worker process died while the driver waited for it."""


def _worker_main(rank: int, world: int, init: str, presets: tuple[str, ...],
                 model_path: str | None, device: str, timeout_s: float, inbox, outbox) -> None:
    import torch
    import torch.distributed as dist

    from ..models import load_preset
    from .sequence import install
    from .ulysses import GroupCache

    torch.set_num_threads(int(os.environ.get("GENSERVE_WORKER_THREADS", "1")))
    dev = device if device == "cpu" else f"{device}:{rank}"
    backend = "gloo" if device == "cpu" else "nccl"
    try:
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        # Every subset up to one 8-GPU node (the scheduler may pick any free GPUs of a node);
        # beyond that only aligned contiguous sets, to bound start-up.
        groups = GroupCache(world, contiguous_only=world > 8)
        adapters = {p: load_preset(p, model_path, dev) for p in presets}
        sps = {p: install(ad.transformer) for p, ad in adapters.items()}
    except Exception as e:  # e.g. a bad checkpoint path: tell the driver, then exit
        outbox.put(("failed", rank, f"worker {rank} could not start: {e}"))
        return
    outbox.put(("ready", rank, None))
    while True:
        job = inbox.get()
        if job is None:
            break
        job_id, kind, ranks, payload = job
        try:
            if kind == "prepare":
                model, reqs = payload
                out = [s.to_bytes() for s in _adapter(adapters, model).prepare(reqs)]
            elif kind == "decode":
                states = [StepState.from_bytes(b).to(dev) for b in payload]
                out = _adapter(adapters, states[0].model).decode(states)
            elif kind == "steps":
                blobs, n = payload[:2]
                decode_done = len(payload) > 2 and payload[2]
                states = [StepState.from_bytes(b).to(dev) for b in blobs]
                adapter = _adapter(adapters, states[0].model)
                group = (None if len(ranks) == 1 else dist.group.WORLD if len(ranks) == world
                         else groups.get(ranks))
                with sps[adapter.name].use(group):
                    for _ in range(n):
                        adapter.step(states)
                out = None
                if rank == ranks[0]:
                    out = [s.to_bytes() for s in states]
                    if decode_done:  # outputs of the requests this job finished
                        done = [s for s in states if s.done]
                        out = (out, dict(zip([s.request_id for s in done], adapter.decode(done))))
            else:
                raise ValueError(f"unknown job kind {kind!r}")
            if rank == ranks[0]:
                outbox.put(("done", job_id, out))
        except ValueError as e:  # bad input (ModelInputError is one): the message says it all
            outbox.put(("error", job_id, f"worker {rank}: {e}"))
        except Exception as e:  # reported to the driver; the worker stays up
            outbox.put(("error", job_id, f"worker {rank}: {type(e).__name__}: {e}\n"
                                         f"{traceback.format_exc(limit=3)}"))
    dist.destroy_process_group()


def _adapter(adapters: dict, model: str):
    try:
        return adapters[model]
    except KeyError:
        raise ValueError(f"model={model!r}: not served by these workers "
                         f"(they hold {', '.join(adapters)})") from None


class WorkerPool:
    """`n` worker processes serving one or more presets; jobs run on any subset of them."""

    def __init__(self, preset: str | tuple[str, ...], n: int, model_path: str | None = None,
                 device: str = "cpu",
                 collective_timeout_s: float = 60.0, start_timeout_s: float = 300.0,
                 poll_s: float = 0.2):
        if n < 1:
            raise ValueError(f"workers must be >= 1, got {n}")
        self.n, self.poll_s = n, poll_s
        self.presets = (preset,) if isinstance(preset, str) else tuple(preset)
        ctx = mp.get_context("spawn")
        self._dir = tempfile.TemporaryDirectory(prefix="genserve-rdzv-")
        init = f"file://{os.path.join(self._dir.name, 'rdzv')}"
        self._inboxes = [ctx.Queue() for _ in range(n)]
        self._outbox = ctx.Queue()
        self.procs = [ctx.Process(target=_worker_main, daemon=True,
                                  args=(r, n, init, self.presets, model_path, device,
                                        collective_timeout_s, self._inboxes[r], self._outbox))
                      for r in range(n)]
        for p in self.procs:
            p.start()
        self._ids = itertools.count()
        self._results: dict[int, tuple[str, object]] = {}
        self._jobs: dict[int, tuple[int, ...]] = {}
        ready = set()
        deadline = time.monotonic() + start_timeout_s
        while len(ready) < n:
            if time.monotonic() > deadline:
                self.close()
                raise WorkerLost(f"workers did not start within {start_timeout_s:.0f} s")
            try:
                tag, rank, msg = self._outbox.get(timeout=poll_s)
            except queue.Empty:
                self._check_alive(range(n), "start-up")
                continue
            if tag == "failed":
                self.close()
                raise WorkerError(msg)
            ready.add(rank)

    # ----- jobs -----
    def submit(self, kind: str, ranks: tuple[int, ...], payload) -> int:
        ranks = tuple(sorted(ranks))
        if not ranks or ranks[0] < 0 or ranks[-1] >= self.n or len(set(ranks)) != len(ranks):
            raise ValueError(f"ranks {ranks} are not distinct workers of 0..{self.n - 1}")
        self._check_alive(ranks, "submit")
        job_id = next(self._ids)
        self._jobs[job_id] = ranks
        for r in ranks:
            self._inboxes[r].put((job_id, kind, ranks, payload))
        return job_id

    def finished(self, timeout_s: float = 0.0) -> list[int]:
        """Jobs whose results arrived (waiting up to `timeout_s` for the first); raises
        `WorkerLost` if a worker of a pending job died."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                tag, jid, out = self._outbox.get(timeout=max(deadline - time.monotonic(), 0.001))
                self._results[jid] = (tag, out)
                timeout_s = 0.0
                deadline = time.monotonic()
            except queue.Empty:
                break
        for jid, ranks in self._jobs.items():
            if jid not in self._results:
                self._check_alive(ranks, f"job {jid}")
        return [j for j in self._results if j in self._jobs]

    def wait(self, job_id: int, timeout_s: float | None = None):
        ranks = self._jobs[job_id]
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while job_id not in self._results:
            self._check_alive(ranks, f"job {job_id}")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} on workers {ranks} took over {timeout_s} s")
            try:
                tag, jid, out = self._outbox.get(timeout=self.poll_s)
            except queue.Empty:
                continue
            self._results[jid] = (tag, out)
        tag, out = self._results.pop(job_id)
        del self._jobs[job_id]
        if tag == "error":
            # A collective fails on the survivors when a member dies: report the death.
            time.sleep(self.poll_s)
            self._check_alive(ranks, f"job {job_id}")
            raise WorkerError(out)
        return out

    def prepare(self, reqs: list[GenRequest], rank: int = 0, model: str | None = None
                ) -> list[StepState]:
        model = model or self.presets[0]
        return [StepState.from_bytes(b)
                for b in self.wait(self.submit("prepare", (rank,), (model, reqs)))]

    def steps(self, ranks: tuple[int, ...], states: list[StepState], n: int = 1
              ) -> list[StepState]:
        """Run `n` steps of a batch of states on the workers `ranks` (SP degree = len(ranks))."""
        blobs = [s.to_bytes() for s in states]
        return [StepState.from_bytes(b)
                for b in self.wait(self.submit("steps", ranks, (blobs, n)))]

    def decode(self, states: list[StepState], rank: int = 0):
        return self.wait(self.submit("decode", (rank,), [s.to_bytes() for s in states]))

    # ----- lifecycle -----
    def _check_alive(self, ranks, what: str) -> None:
        for r in ranks:
            p = self.procs[r]
            if not p.is_alive():
                raise WorkerLost(f"worker {r} died (exit code {p.exitcode}) during {what}")

    def alive(self) -> list[int]:
        return [r for r, p in enumerate(self.procs) if p.is_alive()]

    def close(self) -> None:
        for r, p in enumerate(self.procs):
            if p.is_alive():
                self._inboxes[r].put(None)
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        self._dir.cleanup()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
