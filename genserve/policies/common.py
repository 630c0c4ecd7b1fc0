"""Helpers shared by policies: GPU placement and per-request step-time queries."""

from __future__ import annotations

from typing import Iterable

from ..catalog import get_model
from ..latency import LatencyModel
from ..request import Kind, Request
from .base import Cluster


class GpuPool:
    """Free GPUs at one decision point; hands out SP groups, preferring one node.

    Placement rules, in order: reuse the GPUs that already hold the request's state (no move);
    stay inside one node (NVLink), best fit so big groups keep whole nodes; span nodes only when no
    node has room (the latency model then charges cross-node bandwidth).

    `aware=False` is the topology-blind placement a scheduler that does not know the nodes would
    make (the baseline of the topology experiment): it still reuses the request's GPUs when they
    are all free (state locality, not topology), else takes the lowest-index free GPUs, whatever
    nodes they are on; `allow_span` means nothing to it.
    """

    def __init__(self, free: Iterable[int], cluster: Cluster, aware: bool = True):
        self.cluster = cluster
        self.aware = aware
        self.by_node: dict[int, list[int]] = {}
        self.count = 0
        for g in sorted(free):
            self.by_node.setdefault(cluster.node(g), []).append(g)
            self.count += 1

    def __len__(self) -> int:
        return self.count

    def max_in_node(self) -> int:
        return max((len(v) for v in self.by_node.values()), default=0)

    def take(self, k: int, prefer: tuple[int, ...] = (), allow_span: bool = True
             ) -> tuple[int, ...] | None:
        if k < 1 or len(self) < k:
            return None
        if not self.aware:
            return self._take_blind(k, prefer)
        if prefer:
            mine = [g for g in prefer if g in self.by_node.get(self.cluster.node(g), ())]
            if len(mine) >= k and not self.cluster.spans_nodes(tuple(mine[:k])):
                return self._remove(mine[:k])
            # Grow from the node that holds most of the request's state.
            node = max({self.cluster.node(g) for g in prefer},
                       key=lambda n: (len([g for g in mine if self.cluster.node(g) == n])))
            avail = self.by_node.get(node, [])
            if len(avail) >= k:
                keep = [g for g in mine if self.cluster.node(g) == node][:k]
                extra = [g for g in avail if g not in keep][: k - len(keep)]
                return self._remove(keep + extra)
        fits = [(len(v), n) for n, v in self.by_node.items() if len(v) >= k]
        if fits:
            _, node = min(fits)
            return self._remove(self.by_node[node][:k])
        if not allow_span:
            return None
        picked: list[int] = []
        for n, v in sorted(self.by_node.items(), key=lambda kv: -len(kv[1])):
            picked.extend(v[: k - len(picked)])
            if len(picked) == k:
                break
        return self._remove(picked)

    def _take_blind(self, k: int, prefer: tuple[int, ...]) -> tuple[int, ...]:
        free = sorted(g for v in self.by_node.values() for g in v)
        keep: list[int] = []
        if prefer and set(prefer) <= set(free):
            keep = sorted(prefer)[:k]  # the request's own GPUs (growing keeps them all)
        return self._remove(keep + [g for g in free if g not in keep][: k - len(keep)])

    def take_exact(self, gpus: tuple[int, ...]) -> tuple[int, ...]:
        return self._remove(list(gpus))

    def _remove(self, gpus: list[int]) -> tuple[int, ...]:
        for g in gpus:
            n = self.cluster.node(g)
            self.by_node[n].remove(g)
            if not self.by_node[n]:
                del self.by_node[n]
        self.count -= len(gpus)
        return tuple(sorted(gpus))

    def give_back(self, gpus: Iterable[int]) -> None:
        for g in gpus:
            self.by_node.setdefault(self.cluster.node(g), []).append(g)
            self.by_node[self.cluster.node(g)].sort()
            self.count += 1


def tokens_of(req: Request) -> int:
    return get_model(req.model).tokens(req.height, req.width, req.frames)


def degrees_for(req: Request, latency: LatencyModel, cluster: Cluster) -> tuple[int, ...]:
    return tuple(k for k in latency.degrees(req.model) if k <= cluster.num_gpus)


def default_sp(req: Request, latency: LatencyModel, cluster: Cluster) -> int:
    """The model's default SP degree for this size, capped at the cluster and the profile."""
    k = get_model(req.model).default_sp(req.height, req.width, req.frames, cluster.num_gpus)
    return max(d for d in degrees_for(req, latency, cluster) if d <= k)


def fixed_sp(req: Request, latency: LatencyModel, cluster: Cluster,
             image_sp: int = 0, video_sp: int = 0, cap: int | None = None) -> int:
    """SP degree for fixed-degree policies: an override per kind (0 = model default), capped."""
    want = image_sp if req.kind is Kind.IMAGE else video_sp
    k = want or default_sp(req, latency, cluster)
    limit = min(k, cap if cap is not None else cluster.num_gpus)
    return max((d for d in degrees_for(req, latency, cluster) if d <= limit), default=1)


def finish_cost(req: Request, latency: LatencyModel) -> float:
    """Seconds a request adds outside its steps: encode (not started yet) and decode."""
    extra = latency.decode_time(req.model, req.height, req.width, req.frames)
    if req.steps_done == 0:
        extra += latency.encode_time(req.model)
    return extra
