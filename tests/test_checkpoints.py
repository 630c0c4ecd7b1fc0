"""Checkpoints written by the workers (`parallel/saver.py`), on 4 emulated GPUs (time scale 20).

A worker writes the state it was asked to checkpoint into the engine's checkpoint directory and
reports the path; the driver never receives the bytes.  A newer checkpoint replaces the older
file; the engine's scratch directory goes with its run.  Failures, each caused: the directory is
unwritable (every save fails: the request still finishes, and a worker killed afterwards sends it
back to the start, not to a checkpoint that does not exist); the file is deleted before a resume
reads it (the request starts over instead of failing or looping).  Each output equals the
placeholder of its spec run straight through.  (The real workers' path runs in
test_engine_faults and test_durable.)
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from genserve.emulate import emulation_for
from genserve.emulate.state import EmuState
from genserve.engine import Engine
from genserve.latency import LatencyModel
from genserve.parallel.protocol import Done, Saved
from genserve.parallel.saver import Saver, checkpoint_path, scratch_dir, write_atomic
from genserve.parallel.workers import WorkerPool
from genserve.request import Status

from _policies import Route
from test_emulate import Watched, assert_ended_once, assert_straight, statuses, video, wait_ready

SCALE = 20.0


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(("wan2.1-1.3b",), 4, emulate=emulation_for("h200", SCALE, gpus=4),
                    collective_timeout_s=10) as p:
        yield p


@pytest.fixture(scope="module")
def lat():
    return LatencyModel("h200")


class Results(Watched):
    """`Watched`, also keeping every run's result."""

    def __init__(self, pool, on_submit=None):
        super().__init__(pool, on_submit)
        self.results = []

    def result(self, jid):
        got = self._pool.result(jid)
        self.results.append(got)
        return got


def kill_at(pool, rid: str, step: int, rank: int, before=None):
    """An `on_update` that SIGKILLs worker `rank` 0.15 wall s after `rid` reached `step` (into
    its next job), calling `before()` first; `killed` lists when."""
    killed: list[int] = []

    def kill():
        if before is not None:
            before()
        os.kill(pool.procs[rank].pid, signal.SIGKILL)

    def on_update(r, output):
        if r.id == rid and r.steps_done == step and not killed and r.status is Status.RUNNING:
            killed.append(step)
            threading.Timer(0.15, kill).start()

    return on_update, killed


def test_workers_write_checkpoints_and_the_driver_gets_only_paths(pool, lat, tmp_path):
    """A 20-step video moves 1 -> 2 -> 3, 6 steps a quantum, with checkpoints every 4 steps
    (taken at the end of the quantum that crosses one: steps 6 and 12): each arrives as a file of
    the state's real size, the older one goes, and no state bytes come back in a result."""
    wait_ready(pool)
    vid = video("ck-paths", steps=20)
    seen: list[tuple[int, str, int]] = []

    def on_checkpoint(rid, steps, saved):
        assert isinstance(saved, str), type(saved)  # a path, never the bytes
        seen.append((steps, saved, os.path.getsize(saved)))

    watched = Results(pool)
    res = Engine(Route({vid.id: [((1,), 6), ((2,), 6), ((3,), 99)]}), watched, lat, 4,
                 time_scale=SCALE, checkpoint_every=4, on_checkpoint=on_checkpoint,
                 checkpoint_dir=str(tmp_path)).run([vid])
    assert_ended_once(vid, Status.FINISHED)
    assert_straight(res, vid)
    size = len(EmuState.new(vid.id, vid.spec).to_bytes())
    assert [s for s, _, _ in seen] == [6, 12] and {n for _, _, n in seen} == {size}, seen
    assert all(Path(p) == checkpoint_path(tmp_path, vid.id, s) for s, p, _ in seen)
    # The newest file is left to the directory's owner; the older ones went.
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{vid.id}.12.state"]
    runs = [r.result for r in watched.results if isinstance(r, Done)]
    assert runs and not any(r.blobs for r in runs)

    # Without a directory of its own, the engine's scratch one goes with the run.
    seen.clear()
    vid2 = video("ck-scratch", steps=12)
    Engine(Route({vid2.id: [((1,), 4), ((1,), 4), ((1,), 99)]}), pool, lat, 4,
           time_scale=SCALE, checkpoint_every=4, on_checkpoint=on_checkpoint).run([vid2])
    assert_ended_once(vid2, Status.FINISHED)
    assert [s for s, _, _ in seen] == [4, 8] and not os.path.exists(os.path.dirname(seen[0][1]))
    assert os.path.basename(os.path.dirname(seen[0][1])).startswith(f"genserve-ck-{os.getpid()}-")


def test_unwritable_checkpoints_cost_only_themselves(pool, lat, tmp_path):
    """The checkpoint directory is a regular file: every save fails, reported as such.  The
    video still finishes; its worker killed mid-job sends it back to the start (no checkpoint
    counted), and it finishes with the straight output."""
    wait_ready(pool)
    blocked = tmp_path / "ck"
    blocked.write_text("not a directory")
    vid = video("ck-unwritable", steps=24)
    on_update, killed = kill_at(pool, vid.id, 8, 2)
    checkpoints: list[int] = []
    watched = Watched(pool)
    eng = Engine(Route({vid.id: [((2,), 8), ((2,), 99)]}), watched, lat, 4, time_scale=SCALE,
                 checkpoint_every=4, on_update=on_update, checkpoint_dir=str(blocked),
                 on_checkpoint=lambda rid, steps, saved: checkpoints.append(steps))
    res = eng.run([vid])
    assert_ended_once(vid, Status.FINISHED)
    assert_straight(res, vid)
    assert killed == [8] and res.restarts == 1, (killed, res.restarts)
    assert checkpoints == []
    # Back to the start: New again, never a checkpoint.
    assert watched.members == ["New", "Resident", "New", "Resident"], watched.members
    assert blocked.read_text() == "not a directory"


def test_a_checkpoint_deleted_before_its_resume_makes_the_request_start_over(pool, lat,
                                                                            tmp_path):
    """The video runs 8 steps on worker 3 (checkpointed at step 8); 0.15 s into its next job the
    file is deleted, then the worker SIGKILLed.  The resume cannot read the file: the request starts over (once), and its
    output is the straight one."""
    wait_ready(pool)
    vid = video("ck-deleted", steps=24)
    on_update, killed = kill_at(pool, vid.id, 8, 3, before=lambda: [
        p.unlink() for p in tmp_path.iterdir()])
    watched = Watched(pool)
    res = Engine(Route({vid.id: [((3,), 8), ((3,), 99)]}), watched, lat, 4, time_scale=SCALE,
                 checkpoint_every=4, on_update=on_update, checkpoint_dir=str(tmp_path)
                 ).run([vid])
    assert_ended_once(vid, Status.FINISHED)
    assert_straight(res, vid)
    assert killed == [8] and res.restarts == 1
    # Lost job (Resident), the unreadable checkpoint (Stored), then from the start (New).
    assert watched.members[:3] == ["New", "Resident", "Stored"], watched.members
    assert watched.members[3] == "New", watched.members
    assert statuses(vid).count(Status.PREEMPTED) >= 2  # back to 8, then back to 0


def test_a_run_on_a_pool_that_a_halted_run_left_busy_finishes(pool, lat):
    """A run halted with a job in flight leaves that job to the pool; the next run on the same
    pool sees it end and carries on with its own requests (it used to fail on the unknown job)."""
    wait_ready(pool)
    long = video("halted-long", frames_=81, steps=20)  # 1.2 trace s a step: 1.2 s wall
    first = Engine(Route({long.id: [((0,), 99)]}), pool, lat, 4, time_scale=SCALE)
    threading.Timer(0.3, first.halt).start()
    first.run([long])
    assert not long.is_final  # its job is still running on worker 0
    vid = video("after-halt", frames_=81, steps=20)
    res = Engine(Route({vid.id: [((1,), 99)]}), pool, lat, 4, time_scale=SCALE).run([vid])
    assert_ended_once(vid, Status.FINISHED)
    assert_straight(res, vid)


def test_a_failed_save_of_an_earlier_runs_request_is_no_warning(pool, lat, tmp_path, caplog):
    """`serve --emulate` times its engine with a probe run first; a save of the probe's video
    could fail after that run removed its scratch directory, and the next run logged a warning
    about a request it never had.  Such a report, and a stale file of one, are dropped quietly;
    a failed save of a request of this run is still a warning."""
    wait_ready(pool)
    stale = tmp_path / "earlier.12.state"
    stale.write_bytes(b"x")
    pool._saved += [Saved("earlier-probe", 12, error="FileNotFoundError: gone"),
                    Saved("earlier-done", 12, path=str(stale))]
    vid = video("after-probe", steps=8)
    with caplog.at_level("WARNING", logger="genserve"):
        Engine(Route({vid.id: [((1,), 4), ((1,), 99)]}), pool, lat, 4, time_scale=SCALE,
               checkpoint_every=4, checkpoint_dir=str(blocked_dir(tmp_path))).run([vid])
    assert_ended_once(vid, Status.FINISHED)
    assert not stale.exists()
    warned = [r.getMessage() for r in caplog.records if "not saved" in r.getMessage()]
    assert warned and all(vid.id in m for m in warned), warned


def test_a_late_save_of_an_earlier_run_whose_request_id_repeats_is_not_taken(pool, lat, tmp_path,
                                                                            caplog):
    """The same trace run twice on one pool (the fidelity bench's backlog): saves of the first,
    halted run arrive during the second, for requests of the same ids.  They are not this run's:
    a failed one is no warning, and a written one is neither adopted nor removed (its run's
    directory is that run's)."""
    wait_ready(pool)
    earlier = tmp_path / "earlier-run"
    earlier.mkdir()
    theirs = earlier / "same-id.4.state"
    theirs.write_bytes(b"x")
    pool._saved += [Saved("same-id", 4, error="FileNotFoundError: gone", directory=str(earlier)),
                    Saved("same-id", 4, path=str(theirs), directory=str(earlier))]
    mine = tmp_path / "ck"
    mine.mkdir()
    vid = video("same-id", steps=8)
    with caplog.at_level("WARNING", logger="genserve"):
        Engine(Route({vid.id: [((1,), 4), ((1,), 99)]}), pool, lat, 4, time_scale=SCALE,
               checkpoint_every=4, checkpoint_dir=str(mine)).run([vid])
    assert_ended_once(vid, Status.FINISHED)
    assert theirs.exists()
    assert not [r.getMessage() for r in caplog.records if "not saved" in r.getMessage()]


def blocked_dir(tmp_path: Path) -> Path:
    """A checkpoint directory that is a regular file: every save of this run fails."""
    blocked = tmp_path / "ck"
    blocked.write_text("not a directory")
    return blocked


# ----- the saver alone -----

def test_a_write_that_runs_out_of_space_leaves_no_file_and_the_saver_goes_on(tmp_path):
    """The file-size limit stands in for a full disk: the write fails half way (EFBIG), leaving
    neither the file nor its temporary, and is reported; the next save succeeds."""
    import resource

    got = []

    class Box:
        def put(self, msg):
            got.append(msg)

    saver = Saver(0, Box())
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, hard))
    try:
        saver.save(str(tmp_path), "r-0", 4, bytes(1 << 20))
        for _ in range(500):
            if got:
                break
            threading.Event().wait(0.01)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    saver.save(str(tmp_path), "r-0", 8, lambda: b"state")
    for _ in range(500):
        if len(got) == 2:
            break
        threading.Event().wait(0.01)
    assert got[0].rid == "r-0" and got[0].steps == 4 and not got[0].path, got
    assert "File too large" in got[0].error, got[0].error
    assert got[1] == Saved("r-0", 8, str(checkpoint_path(tmp_path, "r-0", 8)),
                           directory=str(tmp_path))
    assert got[0].directory == str(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r-0.8.state"]
    # A write into a missing directory fails whole, too.
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "gone" / "x.state", b"x")


def test_scratch_directories_of_dead_drivers_are_removed_by_the_next_one(tmp_path):
    """A driver SIGKILLed leaves its scratch directory (checkpoints, the emulated exchange); the
    next one made with that prefix removes it, and leaves those of live processes alone."""
    import multiprocessing as mp

    child = mp.get_context("fork").Process(target=os._exit, args=(0,))
    child.start()
    child.join()
    dead = tmp_path / f"genserve-ck-{child.pid}-abcd"
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "r-0.4.state").write_bytes(b"left behind")
    live = tmp_path / f"genserve-ck-{os.getpid()}-efgh"
    live.mkdir()
    other = tmp_path / f"genserve-emu-{child.pid}-ijkl"  # another prefix: not this one's
    other.mkdir()
    new = Path(scratch_dir("genserve-ck-", str(tmp_path)))
    assert new.name.startswith(f"genserve-ck-{os.getpid()}-") and new.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, new.name])
