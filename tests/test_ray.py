"""Workers on a Ray cluster: a local cluster of two worker nodes (2 CPU workers each), tiny presets.

- Ranks are numbered node by node and the engine sees that layout (`Cluster.nodes`).
- An SP-2 group inside a node and one spanning the two nodes give the output of one device.
- `genserve serve --ray ADDRESS` answers an image and a video over HTTP with workers on the cluster.
- A killed actor is replaced in its bundle, joins a re-formed world and takes jobs again; a
  replacement that dies before it starts is asked for again without counting a second loss.
- The acceptance run: the `genserve` policy serves a mixed workload; one node is removed (its
  raylet and actors die) while it holds running videos.  No request is lost: every request ends
  finished, those of the lost node resume from their host checkpoints on the surviving node, and
  every output equals running the request alone.
"""

from __future__ import annotations

import base64
import signal
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from genserve.cluster import RayWorkerPool  # noqa: E402
from genserve.engine import Engine  # noqa: E402
from genserve.latency import LatencyModel  # noqa: E402
from genserve.models import GenRequest, load_preset  # noqa: E402
from genserve.policies import make_policy  # noqa: E402
from genserve.profiler import profile_workers, write_profile  # noqa: E402
from genserve.request import Kind, Request, Status  # noqa: E402
from genserve.spec import GenSpec  # noqa: E402

PRESETS = ("tiny-t2i", "tiny-t2v")
VIDEO = dict(height=128, width=128, frames=17)
IMAGE = dict(height=64, width=64, frames=1)


@pytest.fixture(scope="module")
def cluster():
    # The head holds no workers (the driver, the engine and the result queue live there); two
    # worker nodes of 2 logical CPUs each, all on this machine.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [c.add_node(num_cpus=2) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c, nodes
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def pool(cluster):
    p = RayWorkerPool(PRESETS, 4, device="cpu", collective_timeout_s=20, poll_s=0.1)
    yield p
    p.close()


def alone(preset: str, req: GenRequest):
    torch.set_num_threads(1)
    return load_preset(preset).generate(req)


def test_serve_with_ray_answers_images_and_videos(cluster, tmp_path):
    pytest.importorskip("fastapi")
    from test_server_drain import ServeProcess

    c, _ = cluster
    srv = ServeProcess(tmp_path, "--ray", c.address, "--log-level", "info")  # 2 CPU workers
    try:
        assert "Traceback" not in srv.output()
        assert "INFO genserve.ray: world 1: workers [0, 1] on nodes [0, 0]" in srv.output()
        img = srv.http.post("/v1/images/generations",
                            json={"model": "tiny-t2i", "prompt": "a fox", "size": "64x64"})
        assert img.status_code == 200, img.text
        assert base64.b64decode(img.json()["data"][0]["b64_json"])[:4] == b"\x89PNG"
        vid = srv.http.post("/v1/videos", json={"model": "tiny-t2v", "prompt": "a river",
                                                "size": "128x128", "frames": 9})
        assert vid.status_code == 200, vid.text
        deadline = time.monotonic() + 120
        while (v := srv.http.get(f"/v1/videos/{vid.json()['id']}").json())["status"] not in (
                "completed", "failed"):
            assert time.monotonic() < deadline, v
            time.sleep(0.2)
        assert v["status"] == "completed", v
        mp4 = srv.http.get(f"/v1/videos/{v['id']}/content")
        assert mp4.status_code == 200 and len(mp4.content) > 100
        metrics = srv.http.get("/metrics").text
        assert "genserve_workers_down 0.0" in metrics and "genserve_worker_restarts 0.0" in metrics
    finally:
        # SIGTERM: drain, then the server closes its pool (actors and placement group go).
        srv.proc.send_signal(signal.SIGTERM)
        try:
            srv.proc.wait(60)
        finally:
            srv.close()
    assert srv.proc.returncode == 0, srv.output()


def test_ranks_follow_nodes_and_sp_groups_inside_and_across_nodes_match_one_device(pool):
    assert pool.nodes == (0, 0, 1, 1)
    assert pool._node_ids[0] != pool._node_ids[2]
    g = GenRequest("sp", GenSpec("tiny-t2v", 32, 48, frames=9, steps=6, seed=4, prompt="a fox"))
    (s,) = pool.prepare([g])
    for ranks in ((0, 1), (2, 3), (1, 2), (0,)):  # in node 0, in node 1, across both, alone
        (s,) = pool.steps(ranks, [s], 1 if ranks != (0,) else 3)
    assert s.done
    torch.set_num_threads(1)
    ad = load_preset("tiny-t2v")
    (ref,) = ad.prepare([g])
    while not ref.done:
        ad.step([ref])
    torch.testing.assert_close(s.latents, ref.latents, atol=1e-4, rtol=0)


def _workload() -> list[Request]:
    reqs = []
    for i in range(4):  # one video per worker at t=0, so the lost node holds running videos
        reqs.append(Request(f"vid{i}", Kind.VIDEO,
                            GenSpec("tiny-t2v", **VIDEO, steps=40, seed=10 + i,
                                    prompt=f"a river {i}"), arrival=0.0, deadline=600.0))
    for i in range(12):
        t = 0.5 + 0.4 * i
        reqs.append(Request(f"img{i}", Kind.IMAGE,
                            GenSpec("tiny-t2i", **IMAGE, steps=8, seed=100 + i,
                                    prompt=f"a fox {i}"), arrival=t, deadline=t + 60.0))
    return reqs


@pytest.fixture(scope="module")
def latency(pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray-prof")
    write_profile(out, "local", *profile_workers(list(PRESETS), batches=(2,), reps=2, pool=pool))
    return LatencyModel(out)


def _check_outputs(reqs, res) -> None:
    """Every output equals running the request alone, resumed videos included."""
    torch.set_num_threads(1)
    adapters = {m: load_preset(m) for m in PRESETS}
    for r in reqs:
        ref = adapters[r.model].generate(GenRequest(r.id, r.spec))
        diff = int(np.abs(res.outputs[r.id].astype(int) - ref.astype(int)).max())
        assert diff <= 1, (r.id, diff)


def _all_finished_once(reqs) -> None:
    for r in reqs:
        states = [s for _, s in r.history]
        assert states[-1] is Status.FINISHED, (r.id, states, r.reason)
        assert sum(s.is_final for s in states) == 1, (r.id, states)


def test_a_state_moves_worker_to_worker_across_nodes(pool, latency):
    """A paused video planned on another node gets its state straight from its holder (the
    actors' transfer threads, `SendState` on the control channel): 0 -> 2 -> 1, nothing through
    the driver, the output exact."""
    from test_moves import Route, Watched

    vid = Request("ray-move", Kind.VIDEO,
                  GenSpec("tiny-t2v", 32, 32, frames=9, steps=9, seed=7, prompt="a heron"))
    watched = Watched(pool)
    res = Engine(Route({vid.id: [((0,), 3), ((2,), 3), ((1,), 99)]}), watched, latency).run([vid])
    _all_finished_once([vid])
    assert [q[2] for q in res.timeline[vid.id]] == [(0,), (2,), (1,)]
    assert watched.members == ["New", "Incoming", "Incoming"] and res.moves_bytes == 0
    _check_outputs([vid], res)


def test_a_killed_actor_is_replaced_and_joins_a_new_world(pool, latency):
    killed: list[int] = []

    def on_update(r: Request, _out) -> None:
        if (not killed and r.kind is Kind.VIDEO and r.status is Status.RUNNING
                and r.steps_done >= 6 and len(r.gpus) == 1):
            killed.append(r.gpus[0])
            ray.kill(pool._actors[r.gpus[0]], no_restart=True)

    reqs = _workload()
    res = Engine(make_policy("genserve"), pool, latency, checkpoint_every=2,
                 on_update=on_update).run(reqs)
    assert killed
    _all_finished_once(reqs)
    assert res.restarts == 1 and res.recovered >= 1
    # Its bundle's node still has room: Ray places the new actor there, and it joins the others.
    deadline = time.monotonic() + 120
    while pool.down() or not pool.ready():
        assert time.monotonic() < deadline, "the replacement never came up"
        time.sleep(0.2)
    assert pool.alive() == [0, 1, 2, 3] and pool.nodes == (0, 0, 1, 1)
    g = GenRequest("again", GenSpec("tiny-t2v", 32, 48, frames=9, steps=2, seed=4, prompt="a fox"))
    (s,) = pool.prepare([g], rank=killed[0])
    (s,) = pool.steps((killed[0], 3 - killed[0]), [s], 2)  # with a worker of the other node
    assert s.done
    _check_outputs(reqs, res)


def test_a_replacement_that_dies_while_starting_is_asked_for_again(pool, caplog):
    # What Ray does when a node dies: it may place the new actor on that node before the node's
    # heartbeats have run out, and the actor dies at once.  Same loss: no new restart, still down.
    r = 1
    ray.kill(pool._actors[r], no_restart=True)
    deadline = time.monotonic() + 30
    while pool.dead() != [r]:
        assert time.monotonic() < deadline, "the kill was never noticed"
        time.sleep(0.05)
    before = pool.restarts
    pool.replace([r])
    ray.kill(pool._actors[r], no_restart=True)  # the replacement, before it could start
    deadline = time.monotonic() + 120
    while pool.down() or not pool.ready():
        assert time.monotonic() < deadline, "the second replacement never came up"
        assert pool.dead() == []  # down, not dead: the engine would not replace it again
        time.sleep(0.05)
    assert pool.restarts == before + 1
    assert any("died while starting" in m for m in caplog.messages), caplog.messages
    assert pool.alive() == [0, 1, 2, 3] and pool.nodes == (0, 0, 1, 1)
    g = GenRequest("again2",
                   GenSpec("tiny-t2v", 32, 48, frames=9, steps=2, seed=4, prompt="a fox"))
    (s,) = pool.prepare([g], rank=0)
    (s,) = pool.steps((0, 1, 2), [s], 2)  # the new actor in a group across both nodes
    assert s.done


def test_losing_a_node_mid_run_loses_no_request(cluster, pool, latency):
    c, nodes = cluster

    victim_ranks = {r for r in range(pool.n) if pool.nodes[r] == 1}
    victim = next(n for n in nodes if n.node_id == pool._node_ids[min(victim_ranks)])
    hit = threading.Event()

    def on_update(r: Request, _out) -> None:
        # Pull the plug once a video on the victim node is past its first checkpoint.
        if (r.kind is Kind.VIDEO and r.status is Status.RUNNING and r.steps_done >= 6
                and set(r.gpus) <= victim_ranks):
            hit.set()

    removed: list[float] = []

    def killer() -> None:
        if hit.wait(300):
            c.remove_node(victim, allow_graceful=False)
            removed.append(time.monotonic())

    reqs = _workload()
    engine = Engine(make_policy("genserve"), pool, latency, checkpoint_every=2,
                    on_update=on_update)
    t = threading.Thread(target=killer, daemon=True)
    t.start()
    res = engine.run(reqs)
    t.join(5)

    assert removed, "the victim node never held a video past step 6"
    print(f"\n{len(reqs)} requests in {res.end_time:.1f} s; node removed at "
          f"{removed[0] - engine._t0:.1f} s; {res.restarts} workers lost, {res.recovered} "
          f"requests rolled back, {res.preemptions} preemptions, {res.migrations} migrations")
    _all_finished_once(reqs)
    assert res.restarts == len(victim_ranks)
    assert res.recovered >= 1
    # Nowhere to place the lost workers again: they stay down and the survivors did the rest.
    assert pool.down() == sorted(victim_ranks)
    late = [q for r in reqs for q in res.timeline[r.id] if q[0] > removed[0] - engine._t0 + 1]
    assert late and all(not set(g) & victim_ranks for _, _, g in late)
    _check_outputs(reqs, res)
