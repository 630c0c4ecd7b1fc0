"""Ulysses attention on gloo (CPU): sharded results equal single-process attention.

The gloo worlds (2 and 4 ranks, a fresh one per test) run on the session's shared `world_pool`
(tests/_spawn.py), in processes spawned once."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _worker(rank: int, world: int, init: str, cases) -> list:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from genserve.parallel import GroupCache, shard, ulysses_attention, unshard
    from genserve.parallel.ulysses import joint_ulysses_attention

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        groups = GroupCache(range(world))
        for ranks, *_ in cases:  # every rank, in one order: new_group is collective
            groups.make(ranks)
        results = []
        for ranks, b, h, n, d in cases:
            g = torch.Generator().manual_seed(1000 * n + h)
            q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
            ref = F.scaled_dot_product_attention(q, k, v)
            if rank not in ranks:
                results.append(None)
                continue
            group = groups.get(ranks)
            local = ranks.index(rank)
            shards = [shard(x, 2, local, len(ranks)) for x in (q, k, v)]
            o = ulysses_attention(*shards, n_valid=n, group=group)
            full = unshard(o, 2, n, group)
            err = float((full - ref).abs().max())
            # Joint (MMDiT) attention: 5 replicated text tokens appended to the keys.
            tq, tk, tv = (torch.randn(b, h, 5, d, generator=g) for _ in range(3))
            jref = F.scaled_dot_product_attention(torch.cat([q, tq], 2), torch.cat([k, tk], 2),
                                                  torch.cat([v, tv], 2))
            img, txt = joint_ulysses_attention(*shards, tq, tk, tv, n_valid=n, group=group)
            jfull = torch.cat([unshard(img, 2, n, group), txt], 2)
            results.append(max(err, float((jfull - jref).abs().max())))
        return results
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_single_process_including_padding(world_pool):
    cases = [((0, 1), 2, 4, 16, 8),   # divisible
             ((0, 1), 1, 4, 15, 8),   # N % 2 != 0: padded keys masked out
             ((0, 1), 1, 3, 10, 8)]   # heads % 2 != 0: all-gather K/V fallback
    res = world_pool.run(_worker, 2, cases)
    for rank in (0, 1):
        assert all(err < 1e-5 for err in res[rank]), res


def test_four_ranks_and_cached_subgroups(world_pool):
    cases = [((0, 1, 2, 3), 1, 8, 13, 8),  # degree 4, N % 4 != 0
             ((0, 1, 2, 3), 1, 6, 12, 8),  # heads % 4 != 0: fallback
             ((0, 1), 1, 4, 9, 8),         # two degree-2 groups side by side
             ((2, 3), 1, 4, 11, 8)]
    res = world_pool.run(_worker, 4, cases)
    for rank in range(4):
        for (ranks, *_), err in zip(cases, res[rank]):
            if rank in ranks:
                assert err < 1e-5, (rank, ranks, err)
            else:
                assert err is None


def test_unknown_rank_set_is_a_clear_error():
    from genserve.parallel import GroupCache

    cache = GroupCache((0, 1, 3))  # rank 2 was lost; the world was re-formed without it
    assert cache.world_rank(3) == 2
    with pytest.raises(ValueError, match=r"no process group for ranks \(1, 2\): \[2\] not in"):
        cache.make((2, 1))
    with pytest.raises(ValueError, match=r"no process group for ranks \(0, 3\) in the world"):
        cache.get((3, 0))
