"""Worker processes (gloo, CPU): elastic degree changes on changing worker sets, failures."""

from __future__ import annotations

import os
import signal
import time

import pytest

torch = pytest.importorskip("torch")

from genserve.models import GenRequest, GenSpec, load_preset  # noqa: E402
from genserve.models.base import StepState  # noqa: E402
from genserve.parallel.protocol import Noop, Steps  # noqa: E402
from genserve.parallel.workers import WorkerError, WorkerLost, WorkerPool  # noqa: E402

SHAPE = dict(height=32, width=48, frames=9)  # 18 tokens: padding at degree 4


def _request(rid: str, steps: int, seed: int, prompt: str) -> GenRequest:
    return GenRequest(rid, GenSpec("tiny-t2v", **SHAPE, steps=steps, seed=seed, prompt=prompt))


# Workers fork from the tests' fork server (tests/_spawn.py); test_engine_acceptance and the
# serve processes of test_server_drain keep the production spawn path covered.
pytestmark = pytest.mark.usefixtures("forked_worker_pools")


@pytest.fixture(scope="module")
def pool(forked_worker_pools):
    with WorkerPool("tiny-t2v", 4, collective_timeout_s=20) as p:
        yield p


def reference(steps: int):
    torch.set_num_threads(1)
    ad = load_preset("tiny-t2v")
    (s,) = ad.prepare([_request("r", steps, 4, "a fox")])
    while not s.done:
        ad.step([s])
    return s.latents


def test_degree_changes_on_changing_worker_sets_match_one_device(pool):
    (s,) = pool.prepare([_request("r", 6, 4, "a fox")])
    for ranks, n in (((0,), 1), ((2, 3), 2), ((0, 1, 2, 3), 1), ((1,), 1), ((1, 2), 1)):
        (s,) = pool.steps(ranks, [s], n)  # 1 -> 2 -> 4 -> 1 -> 2 on different (unaligned) sets
    assert s.done
    torch.testing.assert_close(s.latents, reference(6), atol=1e-4, rtol=0)
    assert pool.decode([s])[0].shape == (9, 32, 48, 3)


def test_a_job_error_is_reported_and_the_worker_stays_up(pool):
    (s,) = pool.prepare([_request("r", 1, 1, "x")])
    (s,) = pool.steps((0,), [s], 1)
    with pytest.raises(WorkerError, match="no step left"):
        pool.steps((0,), [s], 1)
    with pytest.raises(WorkerError, match="frames"):
        pool.prepare([GenRequest("bad",
                                 GenSpec("tiny-t2v", 32, 48, frames=10, steps=2, seed=1,
                                         prompt="x"))])
    assert pool.alive() == [0, 1, 2, 3]


def test_bad_rank_sets_are_refused(pool):
    with pytest.raises(ValueError, match="not distinct workers"):
        pool.submit((3, 4), Steps((), 1))


def test_killing_a_worker_mid_step_is_reported_quickly_and_others_stay_usable():
    with WorkerPool("tiny-t2v", 4, collective_timeout_s=10) as p:
        (s,) = p.prepare([_request("r", 400, 4, "a fox")])
        job = p.submit((2, 3), Steps((s.to_bytes(),), 400))
        time.sleep(1.0)
        os.kill(p.procs[3].pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WorkerLost, match="worker 3 died"):
            p.wait(job, timeout_s=60)
        assert time.monotonic() - t0 < 5
        # Workers 0 and 1 (and their group) were not involved: still usable.
        (s2,) = p.steps((0, 1), [s], 2)
        assert s2.step_index == 2
        with pytest.raises(WorkerLost):
            p.steps((3,), [s], 1)


def test_a_worker_killed_inside_a_large_result_is_lost_alone_and_quickly():
    """Workers 0 and 1 each write a large result that the driver does not read yet, so both
    block inside their message; worker 1 is killed there, leaving half a message in its channel.
    The driver reports it lost within a couple of seconds, and worker 0's result arrives whole.
    (With one queue shared by all workers the driver's read of the half message waited forever,
    and the lock the dead writer held stopped every other worker's results.)"""
    from multiprocessing.connection import wait

    with WorkerPool("tiny-t2i", 2, collective_timeout_s=10) as p:
        big, other = 64 << 20, 24 << 20  # far over the pipe's capacity
        job = p.submit((1,), Noop(reply_bytes=big))
        job0 = p.submit((0,), Noop(reply_bytes=other))
        assert wait([p._chans[1]], 60) and wait([p._chans[0]], 60)  # both are inside a send
        os.kill(p.procs[1].pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WorkerLost, match=r"worker 1 died .*end of file inside a message"):
            p.wait(job, timeout_s=30)
        assert time.monotonic() - t0 < 2
        assert p.dead() == [1]
        assert p.wait(job0, timeout_s=30) == bytes(other)
        (s,) = p.prepare([GenRequest("r",
                                     GenSpec("tiny-t2i", 32, 32, steps=2, seed=1, prompt="a fox"))])
        assert p.steps((0,), [s], 1)[0].step_index == 1
        p.replace([1])  # and the rank comes back
        assert p.wait(p.submit((1,), Noop(reply_bytes=5)), timeout_s=120) == bytes(5)


def _kill(p: WorkerPool, rank: int) -> None:
    os.kill(p.procs[rank].pid, signal.SIGKILL)
    p.procs[rank].join(10)
    assert not p.procs[rank].is_alive()


def test_a_second_death_while_the_world_re_forms_does_not_take_the_survivors_down():
    """Worker 2 dies and is replaced: 0, 1 and the new 2 meet in a new world, but 3, busy with a
    long job, has not come yet when it dies too.  That world can never form: it is abandoned when
    3 is replaced, and all four meet in the next one, instead of the survivors waiting for 3 until
    the collective timeout (300 s here) and dying in turn."""
    with WorkerPool("tiny-t2v", 4, collective_timeout_s=300) as p:
        (s,) = p.prepare([_request("r", 6, 4, "a fox")])
        (long,) = p.prepare([GenRequest("long",
                                        GenSpec("tiny-t2v", 128, 128, frames=17, steps=3000,
                                                seed=4, prompt="a river"))])
        busy = p.submit((3,), Steps((long.to_bytes(),), 3000))  # about 15 s: 3 comes late
        time.sleep(0.5)
        _kill(p, 2)
        p.replace([2])
        time.sleep(1.0)
        _kill(p, 3)
        with pytest.raises(WorkerLost, match="worker 3 died"):
            p.wait(busy, timeout_s=30)
        p.replace([3])
        deadline = time.monotonic() + 120
        while not p.ready():
            assert time.monotonic() < deadline, "the replacements did not start"
            time.sleep(0.1)
        job = p.submit((0, 1, 2, 3), Steps((s.to_bytes(),), 2))  # the whole world again
        (out,) = p.wait(job, timeout_s=120)
        assert StepState.from_bytes(out).step_index == 2
        assert p.restarts == 2 and p.alive() == [0, 1, 2, 3]

def test_generate_cli_with_sp_matches_sp1(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from genserve.cli import main

    outs = {}
    for model in ("tiny-t2i", "tiny-flux"):
        for sp in (1, 2):  # PNG is lossless (H.264 would amplify 1e-6 differences)
            path = tmp_path / f"{model}-sp{sp}.png"
            assert main(["generate", "--model", model, "--prompt", "a fox", "--steps", "4",
                         "--height", "68", "--width", "68", "--sp", str(sp), "--out", str(path),
                         "--quiet"]) == 0
            outs[model, sp] = np.asarray(Image.open(path)).astype(int)
        # allclose latents, rounded to uint8
        assert np.abs(outs[model, 1] - outs[model, 2]).max() <= 1, model
    capsys.readouterr()


def test_worker_start_up_failure_is_reported(tmp_path):
    from genserve.parallel.workers import WorkerError

    with pytest.raises(WorkerError, match="model_index.json"):
        WorkerPool("sd3-medium", 2, model_path=str(tmp_path))
