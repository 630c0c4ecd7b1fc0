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
    """If a selected test uses `world_pool`, its fork server imports torch & co. in the background
    while the tests before it run."""
    if any("world_pool" in getattr(item, "fixturenames", ()) for item in session.items):
        from _spawn import start_fork_server

        start_fork_server()


@pytest.fixture(scope="session")
def world_pool():
    """Up to 4 spawned processes shared by the multi-process tests (tests/_spawn.py): one spawn
    (torch + diffusers imports) per rank for the whole session instead of one per world; every
    call still gets a fresh torch.distributed world."""
    from _spawn import WorldPool

    pool = WorldPool(size=4)
    yield pool
    pool.shutdown()
