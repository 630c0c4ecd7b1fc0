"""Workers as Ray actors across the nodes of a Ray cluster: `genserve serve --ray ADDRESS`.

Ray places and supervises the processes; everything else is the process pool's: the same
`worker_main` runs inside each actor, the same typed messages (`parallel/protocol.py`), the same
engine.  What differs:

- Placement.  One placement group, one bundle per GPU (`PACK`: fill a node before the next), and
  ranks are numbered node by node, so the scheduler's `Cluster.nodes` says which GPUs share a node
  and its placement keeps SP groups inside one (NVLink) unless spanning pays.  A group is a
  torch.distributed group made by its own members on first use (`GroupCache`), so groups that stay
  inside a node only ever talk over that node's links.
- Rendezvous.  The driver hosts the worlds' store (`parallel/authstore.py`) on its node's
  cluster address, and only clients that know the run's secret (sent to the actors with their
  loop call) can use it; every world (the first, and one per re-formation) uses a fresh key
  prefix of it.
- Transport.  Jobs and control messages are actor calls, numbered per actor so that a threaded
  actor still queues them in order; results come back through one Ray queue that lives on the
  driver's node (a queue on a worker node would die with it).  One queue for all workers is safe
  here, unlike one `multiprocessing.Queue` on one machine (see `parallel/channel.py`): each
  message is a whole object handed to the queue actor by one call, so a worker that dies while
  sending takes only its own message with it, and holds no lock the others need.  The driver
  does not need to know who sent a message either: worker deaths come from the actors' loop refs.
  A move never takes this way (checkpoints do): it is a `SendState` on the holder's control
  channel, and the state goes actor to actor over the world's transfer groups
  (`parallel/transfer.py`), across nodes over their own link.
- Loss.  An actor (or its whole node) that dies is noticed within `poll_s`, its jobs end as lost,
  and `replace` asks Ray for a new actor in the same bundle: Ray re-places the bundle on any node
  with room.  Until it is placed the rank is `down` (the engine plans without it) and the survivors
  re-form the world among themselves at once, keeping their models and resident states; when the
  new actor comes up it joins the next re-formed world.  The requests that were on the lost
  workers resume from their host-side checkpoints, on whatever GPUs the policy picks.
- Hangs.  The actors send heartbeats like the processes of one machine (`parallel/liveness.py`);
  one declared hung is killed (`ray.kill`) and then lost like a dead one.
- The driver's end.  Every actor (the workers, the result queue) and the placement group belong to
  the driver's job: none is detached (no `lifetime="detached"`), so when the driver exits or dies,
  SIGKILL included, Ray kills the actors and frees their bundles.  Nothing of a run outlives it.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time

from ..parallel.protocol import Rendezvous, Restart, Shutdown
from ..parallel.workers import PoolBase, WorkerLost
from ..parallel.world import WorkerSpec

log = logging.getLogger("genserve.ray")


class _RayWorker:
    """The actor around `worker_main`: calls arrive on Ray's threads and are queued in order."""

    def __init__(self):
        self.inbox: queue.Queue = queue.Queue()
        self.ctl: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._next = 0
        self._held: dict[int, tuple[int, object]] = {}

    def where(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def deliver(self, seq: int, channel: int, msg) -> None:
        # A threaded actor may run two calls of one caller out of order: re-order by number.
        with self._lock:
            self._held[seq] = (channel, msg)
            while self._next in self._held:
                ch, m = self._held.pop(self._next)
                (self.inbox if ch == 0 else self.ctl).put(m)
                self._next += 1

    def loop(self, rank: int, spec: WorkerSpec, world: Rendezvous, members: tuple[int, ...],
             outbox) -> None:
        from ..parallel.process import entry_point

        worker_main = entry_point(spec)  # torch (a real worker): in the actor only
        worker_main(rank, spec, world, members, self.inbox, self.ctl, outbox, device_index=0)


class RayWorkerPool(PoolBase):
    """`n` workers as Ray actors, one per GPU (or per `cpus_per_worker` CPUs with device="cpu")."""

    def __init__(self, preset: str | tuple[str, ...], n: int | None = None,
                 model_path: str | None = None, device: str = "cuda",
                 address: str | None = "auto", collective_timeout_s: float = 60.0,
                 start_timeout_s: float = 600.0, poll_s: float = 0.2,
                 faults: dict | None = None, min_free_bytes: int = 2 << 30,
                 cpus_per_worker: float = 1.0, worker_timeout_s: float | None = None):
        """`address`: the Ray cluster to join ("auto": the one `ray start` made on this node;
        ignored when this process already called `ray.init`).  `n`: workers; default: every GPU
        of the cluster.  `faults`: the process pool's test hook.  `worker_timeout_s`: as
        `WorkerPool`'s (a hung actor is killed and replaced)."""
        try:
            import ray
        except ImportError:
            raise ValueError("--ray needs Ray: pip install 'genserve[ray]'") from None
        from ray.util.placement_group import placement_group, placement_group_table
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._ray = ray
        self._own_ray = not ray.is_initialized()
        if self._own_ray:
            ray.init(address=address, log_to_driver=False)
        gpu = device != "cpu"
        if n is None:
            if not gpu:
                raise ValueError("RayWorkerPool on CPU: give the number of workers")
            n = int(ray.cluster_resources().get("GPU", 0))
            if n < 1:
                raise ValueError("the Ray cluster has no GPU: start its nodes with GPUs, or "
                                 "give the number of workers")
        self._setup(preset, n, poll_s, model_path, device, collective_timeout_s, faults,
                    min_free_bytes, worker_timeout_s)
        self._bundle_res = {"CPU": cpus_per_worker, **({"GPU": 1} if gpu else {})}
        self._actors: list = [None] * n
        self._loops: list = [None] * n
        self._seq = [0] * n
        self._gone: dict[int, str] = {}       # rank -> why its actor ended
        # rank -> ObjectRef of the new actor's `where` (None: waiting for `_retry_at`)
        self._pending: dict[int, object] = {}
        self._retry_at: dict[int, float] = {}
        self._tries: dict[int, int] = {}
        self._checked = 0.0
        self._pg = placement_group([dict(self._bundle_res)] * n, strategy="PACK")
        try:
            ray.get(self._pg.ready(), timeout=start_timeout_s)
        except Exception:  # noqa: BLE001 - GetTimeoutError, or the group was refused
            ray.util.remove_placement_group(self._pg)
            raise WorkerLost(f"the Ray cluster cannot place {n} workers of {self._bundle_res} "
                             f"each within {start_timeout_s:.0f} s (it has "
                             f"{ray.cluster_resources()})") from None
        # Ranks node by node, so that GPUs sharing a node have neighbouring ranks.
        where = placement_group_table(self._pg)["bundles_to_node_id"]
        order = list(dict.fromkeys(where[b] for b in sorted(where)))
        self._bundle = sorted(range(n), key=lambda b: (order.index(where[b]), b))
        self._node_ids = [where[b] for b in self._bundle]
        here = ray.get_runtime_context().get_node_id()
        self._open_store(ray.util.get_node_ip_address())
        self._outbox = Queue(actor_options={
            "num_cpus": 0,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False)})
        self._actor_cls = ray.remote(_RayWorker)
        for r in range(n):
            self._actors[r] = self._new_actor(r)
        members = tuple(range(n))
        world = self._next_world(members)
        log.info("world %d: workers %s on nodes %s (%s)", self._generation, list(members),
                 list(self.nodes), ", ".join(i[:8] for i in dict.fromkeys(self._node_ids)))
        for r in range(n):
            self._start_loop(r, world, members)
        self._await_ready(start_timeout_s)

    # ----- actors -----
    def _new_actor(self, rank: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._seq[rank] = 0
        # Not detached: the actor dies with the driver's job (see the module doc).
        return self._actor_cls.options(
            num_cpus=self._bundle_res["CPU"], num_gpus=self._bundle_res.get("GPU", 0),
            max_concurrency=4, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self._pg, placement_group_bundle_index=self._bundle[rank])).remote()

    def _start_loop(self, rank: int, world: Rendezvous, members: tuple[int, ...]) -> None:
        self._loops[rank] = self._actors[rank].loop.remote(rank, self.spec, world, members,
                                                           self._outbox)
        self._gone.pop(rank, None)
        self._starting[rank] = time.monotonic()

    # ----- transport -----
    def _deliver(self, rank: int, channel: int, msg) -> None:
        self._actors[rank].deliver.remote(self._seq[rank], channel, msg)
        self._seq[rank] += 1

    def _send(self, rank: int, msg) -> None:
        self._deliver(rank, 0, msg)

    def _send_ctl(self, rank: int, msg) -> None:
        self._deliver(rank, 1, msg)

    def _poll(self, timeout_s: float) -> list:
        msgs = []
        try:
            msgs.append(self._outbox.get(timeout=timeout_s) if timeout_s > 0
                        else self._outbox.get_nowait())
            while True:  # drain what is there, wait no more
                msgs.append(self._outbox.get_nowait())
        except queue.Empty:  # ray.util.queue.Empty is one
            pass
        return msgs

    # ----- liveness -----
    def _refresh(self) -> None:
        """Notice ended actor loops and newly placed replacements (at most once per poll)."""
        now = time.monotonic()
        if now - self._checked < self.poll_s:
            return
        self._checked = now
        ray = self._ray
        loops = {ref: r for r, ref in enumerate(self._loops)
                 if ref is not None and r not in self._gone}
        if loops:
            ended, _ = ray.wait(list(loops), num_returns=len(loops), timeout=0)
            for ref in ended:
                try:
                    ray.get(ref)
                    why = "its loop returned"
                except Exception as e:  # noqa: BLE001 - RayActorError, node died, ...
                    why = type(e).__name__
                self._gone[loops[ref]] = why
                log.warning("worker %d on node %s ended: %s", loops[ref],
                            self._node_ids[loops[ref]][:8], why)
        for r, due in list(self._retry_at.items()):
            if now >= due:
                del self._retry_at[r]
                self._ask(r)
        refs = {ref: r for r, ref in self._pending.items() if ref is not None}
        if refs:
            placed, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
            joined = []
            for ref in placed:
                r = refs[ref]
                try:
                    self._node_ids[r] = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - see below
                    # Ray can place the new actor on the very node that just died, before its
                    # heartbeats have run out; that is the same loss, not a new one: ask again,
                    # backing off, and stay down meanwhile.
                    tries = self._tries[r] = self._tries.get(r, 0) + 1
                    wait = min(30.0, 0.5 * 2 ** (tries - 1))
                    self._pending[r] = None
                    self._retry_at[r] = now + wait
                    log.warning("replacement for worker %d died while starting (%s); asking Ray "
                                "again in %.1f s", r, type(e).__name__, wait)
                    continue
                del self._pending[r]
                self._tries.pop(r, None)
                joined.append(r)
            if joined:
                self._reform(joined)

    def _alive(self, rank: int) -> bool:
        self._refresh()
        return self._loops[rank] is not None and rank not in self._gone

    def _kill_hung(self, rank: int, why: str) -> None:
        self._gone[rank] = f"declared hung: {why}"
        log.warning("worker %d on node %s declared hung (%s): killing it", rank,
                    self._node_ids[rank][:8], why)
        try:
            self._ray.kill(self._actors[rank], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone with its node
            pass

    def _death(self, rank: int) -> str:
        node = self._node_ids[rank][:8]
        if rank in self._pending:
            return f"worker {rank} is down (waiting for Ray to place it again)"
        return f"worker {rank} on node {node} was lost ({self._gone.get(rank, 'not started')})"

    def down(self) -> list[int]:
        self._refresh()
        return sorted(self._pending)

    @property
    def nodes(self) -> tuple[int, ...]:
        ids = list(dict.fromkeys(self._node_ids))
        return tuple(ids.index(i) for i in self._node_ids)

    # ----- loss -----
    def replace(self, ranks: list[int]) -> None:
        """Ask Ray for new actors in place of the dead `ranks` and re-form the world among the
        survivors now; each new actor joins a later world once Ray has placed it (`down` until
        then).  Does not wait."""
        self._alive_now = None
        ranks = sorted(set(ranks))
        if any(self._alive(r) for r in ranks):
            raise ValueError(f"replace: worker(s) {ranks} are not all dead")
        self._lose_jobs_of(ranks)
        for r in ranks:
            self._starting.pop(r, None)
            self._loops[r] = None
            self._ask(r)
        self.spec = dataclasses.replace(self.spec, faults={})  # faults do not follow
        self.restarts += len(ranks)
        self._reform([])

    def _ask(self, rank: int) -> None:
        """A new actor for `rank` in its bundle; `down` until Ray has placed it."""
        try:
            self._ray.kill(self._actors[rank], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone with its node
            pass
        self._actors[rank] = self._new_actor(rank)
        self._pending[rank] = self._actors[rank].where.remote()

    def _reform(self, joining: list[int]) -> None:
        """A new world: the live workers (after their queued jobs) plus the `joining` ones."""
        survivors = [r for r in range(self.n) if r not in joining and self._alive(r)]
        members = tuple(sorted(survivors + list(joining)))
        if not members:
            return
        world = self._next_world(members)
        log.info("world %d: workers %s%s", self._generation, list(members),
                 f" ({list(joining)} joining)" if joining else "")
        for r in survivors:
            self._send(r, Restart(world, members))
        for r in joining:
            self._start_loop(r, world, members)

    def close(self) -> None:
        ray = self._ray
        live = [r for r in range(self.n) if self._loops[r] is not None and r not in self._gone]
        for r in live:
            try:
                self._send(r, Shutdown())
            except Exception:  # noqa: BLE001
                pass
        loops = [self._loops[r] for r in live]
        if loops:
            ray.wait(loops, num_returns=len(loops), timeout=5)
        for a in self._actors:
            if a is not None:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
        try:
            self._outbox.shutdown()
            ray.util.remove_placement_group(self._pg)
        except Exception:  # noqa: BLE001 - the cluster may be gone already
            pass
        self._server.close()
        if self._own_ray:
            ray.shutdown()
