"""The messages between the driver and its workers: frozen dataclasses, one per kind.

Three streams per worker, each with its own message types:

- the inbox (driver -> worker, run in order on the worker's main thread): `Task` (a job,
  addressed to a worker set), `MakeGroups`, `Restart` (join a new world), `Shutdown`;
- the control queue (driver -> worker, served by a second thread even while the main one
  computes): `Fetch`, `Drop`, `Cancel`, `SendState` (handed on to the worker's transfer thread,
  see `transfer.py`), and `Shutdown`, which the worker puts there itself;
- the outbox (worker -> driver): `Ready`, `StartFailed`, `Done` / `JobError` / `JobLost` (how a
  job ended: the same three types are what `PoolBase.result` returns), `Fetched`, `Output` (an
  encoded output, from the worker's encoder thread), `Saved` (a checkpoint file written, from its
  saver thread), `Heartbeat` (from a thread of its own).

A job is one of `Run` (the engine's: its members are `New`, `Resident`, `Held`, `Incoming`,
`Moved` or `Stored`), `Prepare`,
`Steps`, `Decode`, `Profile`, `Noop`.  Every member of a `Task`'s ranks runs it; the first rank
answers for the job (every member answers an error).

Liveness.  A worker that dies is seen by its transport (process exit and end of file on its
channel on one machine, the actor's loop ref on Ray).  One that hangs is not: a SIGSTOPped process,
a deadlocked main thread or a collective that never returns keeps its channel open.  So every
worker also sends a `Heartbeat` every `WorkerSpec.heartbeat_s` from a thread of its own, carrying a
progress counter that its main thread bumps as it works (each transformer block and denoising
step, each message handled): a silent worker, or one that runs a job while its counter stands
still, is declared hung by the driver after `worker_timeout_s`, killed, and then lost like a dead
one (`liveness.Watch`).

Both sides dispatch on the message's type through a table (`handler`); a type that is not in the
table is an error that names it.  No torch here: the driver and the policies import this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

from ..spec import GenRequest, GenSpec


class UnknownMessage(TypeError):
    """A message of a type the receiving side has no handler for."""


def handler(table: dict[type, Callable], msg) -> Callable:
    """The handler of `msg`'s type in `table` (exact type, no subclass lookup)."""
    try:
        return table[type(msg)]
    except KeyError:
        raise UnknownMessage(f"no handler for message type {type(msg).__name__} (expected one "
                             f"of {', '.join(sorted(t.__name__ for t in table))})") from None


def message(cls):
    """A frozen dataclass whose tuple fields also take lists (and keep them as tuples)."""
    seqs = [n for n, t in cls.__annotations__.items() if str(t).startswith("tuple")]
    if seqs:
        def __post_init__(self):
            for n in seqs:
                object.__setattr__(self, n, tuple(getattr(self, n)))  # frozen: through object

        cls.__post_init__ = __post_init__
    return dataclass(frozen=True)(cls)


@message
class Rendezvous:
    """Where a world meets: a store the driver hosts at `host`:`port`, and the key prefix of this
    world (fresh for every world, so a re-formed one never sees the old one's keys; it also names
    the world, e.g. in `SendState`).  `secret`: the run's key for the driver's authenticated store
    (`authstore.py`; hex, never printed: `repr` leaves it out); empty: a plain torch TCPStore (tests)."""

    host: str
    port: int
    prefix: str
    secret: str = field(default="", repr=False)


# ----- the members of a run job: where each request's state comes from -----
@message
class New:
    """A request that has no state yet: the worker encodes its spec (the driver never waits for
    it)."""

    rid: str
    spec: GenSpec


@message
class Resident:
    """The state is resident on the job's workers (they stepped it last)."""

    rid: str


@message
class Held:
    """Worker `src`, one of the job's ranks, holds the state (the job's set overlaps the set that
    stepped it last): it broadcasts it in the job's group; no transfer."""

    rid: str
    src: int


@message
class Incoming:
    """The state comes straight from worker `src` (not in the job): the job's first rank receives
    it as transfer `transfer`, which the driver asked `src` for with `SendState`, and at SP > 1
    broadcasts it in the job's group.  If it cannot come (`src` died, its world was left), the
    member is reported in `RunResult.lost`, not failed."""

    rid: str
    src: int
    transfer: int


@message
class Moved:
    """The state travels with the job (`StepState.to_bytes`): a host-side checkpoint (or, on the
    old path kept for comparison, a state fetched through the driver)."""

    rid: str
    state: bytes


@message
class Stored:
    """The state is in the checkpoint file `path` (`saver.py`: written by a worker, maybe by the
    server's previous run): every rank of the job reads it.  One that cannot be read (gone,
    damaged) is reported in `RunResult.lost`; the request starts over."""

    rid: str
    path: str


Member = Union[New, Resident, Held, Incoming, Moved, Stored]


# ----- jobs -----
@message
class Run:
    """The engine's job: take each member's state, run up to `steps` steps, decode the finished
    ones; the others stay resident.  `want`: requests whose state is also checkpointed.  `save`:
    a directory the driver shares with the worker; the first rank's saver thread writes each wanted
    state there (`saver.py`) and reports it with a `Saved`, so that the bytes never cross to the
    driver.  Empty (a Ray pool, whose workers may sit on other machines): the states come back in
    `RunResult.blobs`.  `output`: how finished outputs come back (None: raw arrays in the
    `RunResult`).  Ends with a `RunResult`."""

    model: str
    members: tuple[Member, ...]
    steps: int
    want: tuple[str, ...] = ()
    output: OutputFormat | None = None
    save: str = ""
    # CFG parallelism (`Assignment.cfg_split`): the lower half of the sorted ranks runs the
    # unconditional branch, the upper half the conditional one, each with Ulysses inside its half.
    cfg_split: bool = False


@message
class Prepare:
    """Encode `requests` into states; ends with their bytes."""

    model: str
    requests: tuple[GenRequest, ...]


@message
class Steps:
    """`n` steps of a batch of states (bytes) on the task's ranks; ends with their bytes."""

    states: tuple[bytes, ...]
    n: int = 1


@message
class Decode:
    """Decode finished states (bytes); ends with one array per state."""

    states: tuple[bytes, ...]


@message
class Profile:
    """`genserve.profiler.profile` inside the worker; ends with its (forward, blocks, meta)."""

    presets: tuple[str, ...]
    batches: tuple[int, ...] = (1, 2, 4)
    reps: int = 5


@message
class Noop:
    """A round trip, to measure dispatch cost; `reply_bytes` > 0 also measures the way back (it
    ends with that many zero bytes)."""

    reply_bytes: int = 0


Job = Union[Run, Prepare, Steps, Decode, Profile, Noop]


@message
class RunResult:
    """How a `Run` ended, per request id.  Only the first rank fills `steps`, `blobs`, `outputs`."""

    steps: dict[str, int] = field(default_factory=dict)       # step index reached
    failed: dict[str, str] = field(default_factory=dict)      # reason (it failed alone)
    cancelled: dict[str, int] = field(default_factory=dict)   # step index where it left
    blobs: dict[str, bytes] = field(default_factory=dict)     # `want`ed states (no `save`)
    outputs: dict[str, Any] = field(default_factory=dict)     # decoded arrays of finished ones
    lost: dict[str, str] = field(default_factory=dict)        # reason its state never came


# ----- driver -> worker: the inbox -----
@message
class Task:
    """Job `job_id` on the worker set `ranks` (sorted; SP degree = its size)."""

    job_id: int
    ranks: tuple[int, ...]
    job: Job


@message
class MakeGroups:
    """Make the process groups of `sets`, in their order: sent to every member of the world, in
    one order, before the first task that needs them (`new_group` is collective over the world).
    One message per member for all the groups a task needs: at 64 workers a message per group
    was hundreds of queue puts on the driver's decision path."""

    sets: tuple[tuple[int, ...], ...]


@message
class Restart:
    """Leave the current world and join the one of `members` at `rendezvous` (a member was lost,
    or comes back); models and resident states stay."""

    rendezvous: Rendezvous
    members: tuple[int, ...]


@message
class Shutdown:
    """End the loop that reads it (the inbox: the worker exits; the control queue: its thread)."""


# ----- driver -> worker: the control queue -----
@message
class _AboutRequests:
    """A control message about the requests `rids`."""

    rids: tuple[str, ...]


@message
class Fetch(_AboutRequests):
    """Take the resident states of `rids` off the worker (they leave it); answered by the
    `Fetched` of the same `req_id`."""

    req_id: int


class Drop(_AboutRequests):
    """Forget the resident states of `rids` (and their cancel marks)."""


class Cancel(_AboutRequests):
    """Stop stepping `rids` at the next step boundary of the job that holds them."""


@message
class SendState:
    """Send the resident state of `rid` to worker `dst` (the first rank of the job that takes it
    as `Incoming(rid, self, transfer)`) in the world of prefix `world`; the state leaves this
    worker.  Served in the order sent by the worker's transfer thread, so that a send that waits
    for its receiver delays neither the control queue nor the job being computed."""

    rid: str
    dst: int
    transfer: int
    world: str


# ----- worker -> driver -----
@message
class Ready:
    """Worker `rank` loaded its models and serves."""

    rank: int


@message
class StartFailed:
    """Worker `rank` could not start (e.g. a bad checkpoint path); it exits."""

    rank: int
    message: str


@message
class Done:
    """Job `job_id` ended; `result`: a `RunResult` for `Run`, else what the job's doc says."""

    job_id: int
    result: Any = None


@message
class JobError:
    """Job `job_id` failed inside a worker, which stays up."""

    job_id: int
    message: str


@message
class JobLost:
    """Job `job_id` cannot end: a member died, or its world was abandoned before it formed."""

    job_id: int
    message: str


@message
class Heartbeat:
    """Worker `rank` is alive; `progress`: how far its main thread got (a counter it bumps per
    transformer block, denoising step and message handled).  The same value for `worker_timeout_s`
    while the worker runs a job: it is stuck (a deadlock, a collective that never returns)."""

    rank: int
    progress: int


@message
class Fetched:
    """The answer to `Fetch` `req_id`: the states' bytes by request id, or the error."""

    req_id: int
    states: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None


# ----- finished outputs, encoded where they are made -----
@message
class OutputFormat:
    """A `Run`'s finished outputs come back encoded (PNG for an image, MP4 at `fps` for a video)
    by the first rank's encoder thread, each in an `Output` of its own, so that only the file
    crosses to the driver and the worker's main thread goes on to its next job meanwhile.  A
    `Run` without one returns raw arrays (`RunResult.outputs`): bit-exact checks, replay."""

    fps: int = 16


@message
class Output:
    """The encoded output of request `rid` (a `models.output.Encoded`'s `data` and `media_type`),
    or why encoding failed (`error`).  Sent after decode, independently of the run's `Done`
    (before or after it): the request ends when this arrives, or runs again from its checkpoint
    if the worker dies first."""

    rid: str
    data: bytes = b""
    media_type: str = ""
    error: str | None = None


@message
class Saved:
    """Request `rid`'s state at step `steps` is in the checkpoint file `path`, written (atomically,
    synced) by the worker's saver thread for a `Run` with `save`; or why it could not be
    (`error`: e.g. the disk is full), in which case the request keeps its older checkpoint.
    Comes apart from the run's `Done`, before or after it."""

    rid: str
    steps: int
    path: str = ""
    error: str | None = None
    # The run's checkpoint directory it was for: an engine that reuses a pool takes only its
    # own run's (request ids repeat from one run to the next, e.g. the same trace twice).
    directory: str = ""


Outcome = Union[Done, JobError, JobLost]
JOBS = (Run, Prepare, Steps, Decode, Profile, Noop)
INBOX = (Task, MakeGroups, Restart, Shutdown)
CONTROL = (Fetch, Drop, Cancel, SendState, Shutdown)
TO_DRIVER = (Ready, StartFailed, Done, JobError, JobLost, Fetched, Output, Saved, Heartbeat)
