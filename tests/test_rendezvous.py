"""The store rendezvous of a re-formed world (the Ray pool's): members meet, then one shared
decision says whether the world formed or the driver abandoned it because a member died first.

The case it exists for: two workers of a node die a second apart, so the survivors are told to
re-form twice.  Without it they waited for the first dead member until the collective timeout, then
exited, and were replaced too (CI saw 6 workers lost where 2 died)."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from genserve.parallel.protocol import (Done, JobLost, MakeGroups, New, Noop, Ready,  # noqa: E402
                                        Rendezvous, Restart, Run, Shutdown, Task)
from genserve.parallel.world import abandon  # noqa: E402
from genserve.spec import GenSpec  # noqa: E402


def _member(rank, members, init, timeout_s, q):
    import torch
    import torch.distributed as dist

    from genserve.parallel.world import Abandoned, rendezvous

    try:
        rendezvous(init, rank, members, "gloo", timeout_s)
        x = torch.ones(1)
        dist.all_reduce(x)
        dist.destroy_process_group()
        q.put((rank, ("formed", float(x))))
    except Abandoned:
        q.put((rank, ("abandoned", None)))
    except TimeoutError as e:
        q.put((rank, ("timeout", str(e))))


@pytest.fixture
def store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def _start(store, prefix, members, who, timeout_s):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init = Rendezvous("127.0.0.1", store.port, prefix)
    procs = [ctx.Process(target=_member, args=(r, members, init, timeout_s, q)) for r in who]
    for p in procs:
        p.start()
    return q, procs


def _collect(q, procs, timeout_s=60):
    out = dict(q.get(timeout=timeout_s) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return out


def test_every_member_came_the_world_forms_and_can_no_longer_be_abandoned(store):
    q, procs = _start(store, "w1/", (0, 1, 2), (0, 1, 2), timeout_s=60)
    assert _collect(q, procs) == {r: ("formed", 3.0) for r in range(3)}
    assert not abandon(store, "w1/")


def test_a_world_abandoned_while_a_member_is_missing_lets_the_others_go(store):
    # Worker 2 died before coming; the rendezvous timeout is long, the abandon frees them early.
    q, procs = _start(store, "w2/", (0, 1, 2), (0, 1), timeout_s=300)
    time.sleep(1.0)
    assert abandon(store, "w2/")
    assert _collect(q, procs, timeout_s=60) == {0: ("abandoned", None), 1: ("abandoned", None)}
    # A straggler that comes after the decision takes the same side, even though every member
    # has now arrived.
    q, procs = _start(store, "w2/", (0, 1, 2), (2,), timeout_s=300)
    assert _collect(q, procs) == {2: ("abandoned", None)}
    # The next world, fresh keys, forms.
    q, procs = _start(store, "w3/", (0, 1), (0, 1), timeout_s=60)
    assert _collect(q, procs) == {0: ("formed", 2.0), 1: ("formed", 2.0)}


def test_a_member_that_never_comes_times_out_naming_it(store):
    q, procs = _start(store, "w4/", (0, 1), (0,), timeout_s=1.0)
    ((tag, msg),) = _collect(q, procs).values()
    assert tag == "timeout" and "[1]" in msg and "w4/" in msg


def _worker(init, members, inbox, ctl, outbox):
    from genserve.parallel.worker_main import worker_main
    from genserve.parallel.world import WorkerSpec

    worker_main(0, WorkerSpec(("tiny-t2i",), timeout_s=300), init, members, inbox, ctl, outbox)


def test_a_worker_whose_world_was_abandoned_runs_alone_and_answers_group_jobs_lost(store):
    ctx = mp.get_context("spawn")
    inbox, ctl, outbox = ctx.Queue(), ctx.Queue(), ctx.Queue()
    # Worker 1 of its first world never comes (it died): the driver abandons the world.
    p = ctx.Process(target=_worker, args=(Rendezvous("127.0.0.1", store.port, "a1/"), (0, 1),
                                          inbox, ctl, outbox))
    p.start()
    try:
        time.sleep(0.5)
        assert abandon(store, "a1/")
        assert outbox.get(timeout=120) == Ready(0)
        g = GenSpec("tiny-t2i", 32, 32, steps=2, seed=1, prompt="a fox")
        inbox.put(MakeGroups(((0, 1),)))  # sent to a world that never formed: skipped
        inbox.put(Task(2, (0, 1), Run("tiny-t2i", (New("x", g),), 1)))
        inbox.put(Task(3, (0,), Run("tiny-t2i", (New("x", g),), 2)))
        lost = outbox.get(timeout=60)
        assert isinstance(lost, JobLost) and lost.job_id == 2 and "abandoned" in lost.message
        done = outbox.get(timeout=60)
        assert isinstance(done, Done) and done.job_id == 3 and "x" in done.result.outputs, done
        # The next world (this worker alone) forms and it serves on.
        inbox.put(Restart(Rendezvous("127.0.0.1", store.port, "a2/"), (0,)))
        inbox.put(Task(4, (0,), Noop()))
        assert outbox.get(timeout=60) == Done(4, None)
    finally:
        inbox.put(Shutdown())
        p.join(30)
    assert p.exitcode == 0


# ----- the driver's store: loopback (or the given address) only, and only with the secret -----

def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets process `pid` listens on."""
    import ipaddress

    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A: LISTEN
                continue
            hexaddr, hexport = f[1].split(":")
            raw = bytes.fromhex(hexaddr)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host-order words
            out.add((str(ipaddress.ip_address(raw)), int(hexport, 16)))
    return out


def _is_loopback(host: str) -> bool:
    import ipaddress

    a = ipaddress.ip_address(host)
    return a.is_loopback or (a.version == 6 and a.ipv4_mapped is not None
                             and a.ipv4_mapped.is_loopback)


def _outside_address() -> str | None:
    """A non-loopback IPv4 address of this machine, if it has one (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            addr = s.getsockname()[0]
    except OSError:
        return None
    return None if _is_loopback(addr) else addr


def test_the_store_serves_only_clients_that_know_the_secret():
    from datetime import timedelta

    from genserve.parallel.authstore import Client, Server, StoreError, new_secret

    secret = new_secret()
    server = Server("127.0.0.1", secret)
    try:
        assert _listening(os.getpid()) >= {("127.0.0.1", server.port)}
        server.local.set("w1//arrived/0", b"1")
        c = Client("127.0.0.1", server.port, secret, timedelta(seconds=5))
        assert c.get("w1//arrived/0") == b"1" and c.check(["w1//arrived/0"])
        assert c.add("n", 2) == 2 and c.add("n", 3) == 5 and c.get("n") == b"5"
        assert c.compare_set("d", "", "formed") == b"formed"
        assert c.compare_set("d", "", "abandoned") == b"formed"  # the first decision stands
        assert c.delete_key("n") and not c.check(["n"]) and c.num_keys() == 2
        with pytest.raises(StoreError, match="timed out"):
            c.wait(["never"], timedelta(seconds=0.2))
        # Without the secret: a guessed one, torch's own client, or bytes thrown at the port.
        with pytest.raises(StoreError, match="handshake failed"):
            Client("127.0.0.1", server.port, new_secret(), timedelta(seconds=5))
        with pytest.raises(Exception):  # noqa: B017 - torch raises DistNetworkError
            dist.TCPStore("127.0.0.1", server.port, is_master=False,
                          timeout=timedelta(seconds=1)).list_keys()
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.settimeout(10)
            nonce = s.recv(64)
            s.sendall(b"\0" * 64)  # a wrong proof: the server says nothing more and hangs up
            assert len(nonce) == 32 and s.recv(64) == b""
        outside = _outside_address()
        if outside is not None:  # listening on loopback only
            with pytest.raises(OSError):
                socket.create_connection((outside, server.port), timeout=2).close()
        assert c.get("d") == b"formed"  # the real client was not disturbed
    finally:
        server.close()


def _auth_member(rank, world, init_method, host, port, secret):
    import torch
    import torch.distributed as dist

    from genserve.parallel.world import rendezvous

    rendezvous(Rendezvous(host, port, "s1/", secret), rank, tuple(range(world)), "gloo", 30)
    x = torch.ones(1)
    dist.all_reduce(x, group=dist.new_group([0, 1]))
    dist.destroy_process_group()
    return float(x)


def test_a_world_forms_in_the_store_and_a_client_without_the_secret_cannot_join(world_pool):
    from genserve.parallel.authstore import Server, StoreError, new_secret
    from genserve.parallel.world import rendezvous

    secret = new_secret()
    server = Server("127.0.0.1", secret)
    try:
        got = world_pool.run(_auth_member, 2, "127.0.0.1", server.port, secret)
        assert got == {0: 2.0, 1: 2.0}
        with pytest.raises(StoreError):
            rendezvous(Rendezvous("127.0.0.1", server.port, "s1/", new_secret()), 2, (0, 1, 2),
                       "gloo", 5)
        assert not dist.is_initialized()
    finally:
        server.close()


@pytest.mark.usefixtures("forked_worker_pools")
def test_a_pools_store_and_worker_sockets_listen_on_loopback_and_need_the_secret():
    """What a process of this machine (or of another) can reach of a running pool: the driver's
    store and the workers' gloo sockets listen on loopback only, and a client that does not know
    the run's secret reads no key (torch's TCPStore, used before, listened on every interface and
    listed every key to any client)."""
    from datetime import timedelta

    from genserve.parallel.authstore import Client, StoreError, new_secret
    from genserve.parallel.protocol import Noop
    from genserve.parallel.workers import WorkerPool

    before = _listening(os.getpid())
    with WorkerPool("tiny-t2i", 2, collective_timeout_s=20) as pool:
        assert pool.wait(pool.submit((0, 1), Noop()), timeout_s=60) is None  # a group: gloo
        store = _listening(os.getpid()) - before
        workers = set().union(*(_listening(p.pid) for p in pool.procs))
        assert store and workers
        assert all(_is_loopback(h) for h, _ in store | workers), store | workers
        outside = _outside_address()
        for _, port in store:
            if outside is not None:
                with pytest.raises(OSError):
                    socket.create_connection((outside, port), timeout=2).close()
            with pytest.raises(Exception):  # noqa: B017 - torch raises DistNetworkError
                dist.TCPStore("127.0.0.1", port, is_master=False,
                              timeout=timedelta(seconds=1)).list_keys()
            with pytest.raises(StoreError):
                Client("127.0.0.1", port, new_secret(), timedelta(seconds=5))
        assert pool.wait(pool.submit((0, 1), Noop()), timeout_s=60) is None
