import json
from importlib import resources

import pytest

from genserve.latency import LatencyModel

PROFILE_DIR = resources.files("genserve") / "data" / "profiles"


@pytest.fixture(scope="session")
def latency():
    """The shipped h200 profile (read-only; LatencyModel only caches step times)."""
    return LatencyModel()


@pytest.fixture(scope="session")
def profile_rows():
    """(forward rows, block rows) of the shipped h200 profile, read straight from the JSON."""
    fwd = json.loads((PROFILE_DIR / "h200_diffusers_forward.json").read_text())["rows"]
    blk = json.loads((PROFILE_DIR / "h200_dit_blocks.json").read_text())["rows"]
    return fwd, blk


def pytest_collection_finish(session):
    """If a selected test uses the fork server (`world_pool`, `forked_worker_pools`), it imports
    torch & co. in the background while the tests before it run."""
    if any({"world_pool", "forked_worker_pools"} & set(getattr(item, "fixturenames", ()))
           for item in session.items):
        from _spawn import start_fork_server

        start_fork_server()


@pytest.fixture(scope="session")
def world_pool():
    """Up to 4 processes shared by the multi-process tests (tests/_spawn.py), forked from a fork
    server that imported torch, diffusers and genserve once: no per-world spawn and imports; every
    call still gets a fresh torch.distributed world."""
    from _spawn import WorldPool

    pool = WorldPool(size=4)
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def forked_worker_pools():
    """For the rest of the module, genserve WorkerPools fork their workers from the fork server
    (tests/_spawn.py `forked_worker_pools`: about 7 CPU-s less per worker) instead of spawning
    them.  Opt-in; test_workers keeps the spawn path covered."""
    from _spawn import forked_worker_pools

    with forked_worker_pools():
        yield


@pytest.fixture(scope="module")
def http(server):
    """An httpx client of the module's `server` fixture (a `_serve.Uvicorn`)."""
    import httpx

    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def oai(server):
    """The official openai client on the module's `server` fixture."""
    import openai

    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    yield c
    c.close()
