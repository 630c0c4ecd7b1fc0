"""What an emulated worker is told: where its timings come from and how fast its clock runs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Emulation:
    """Workers that emulate GPUs (see `genserve.emulate`).

    `profile`: the latency profile timings come from (a shipped name, e.g. "h200", or a
    `genserve profile` directory).  `time_scale`: every emulated duration is divided by it (the
    engine's clock runs that much faster: `Engine(time_scale=...)`), so a trace replays S times
    faster and reports in trace seconds.  `gpus_per_node`: the emulated topology (a move or an SP
    group across nodes costs the cross-node bandwidth).  `intra_bw` / `cross_bw`: bytes/s, as the
    driver's `LatencyModel` has them.  `exchange`: the directory where the workers meet to pass
    states (set by the pool)."""

    profile: str = "h200"
    time_scale: float = 1.0
    gpus_per_node: int = 8
    intra_bw: float = 450e9
    cross_bw: float = 50e9
    exchange: str = ""

    def validate(self) -> None:
        problems = []
        if not self.time_scale > 0:
            problems.append(f"time_scale={self.time_scale}: must be > 0")
        if self.gpus_per_node < 1:
            problems.append(f"gpus_per_node={self.gpus_per_node}: must be >= 1")
        if not (self.intra_bw > 0 and self.cross_bw > 0):
            problems.append(f"bandwidths must be > 0, got intra={self.intra_bw} "
                            f"cross={self.cross_bw}")
        if problems:
            raise ValueError("emulation: " + "; ".join(problems))

    def latency(self):
        """The latency model the emulated workers time their jobs with (the driver's own, when
        it plans with the same profile and bandwidths)."""
        from ..latency import Bandwidth, LatencyModel

        return LatencyModel(self.profile, bandwidth=Bandwidth(self.intra_bw, self.cross_bw))

    def node(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def spans_nodes(self, ranks) -> bool:
        return len({self.node(r) for r in ranks}) > 1


def emulation_for(profile: str, time_scale: float = 1.0, gpus: int = 8, nodes: int = 1,
                  intra_bw: float = 450e9, cross_bw: float = 50e9) -> Emulation:
    """The emulation of `gpus` GPUs over `nodes` nodes (`--emulate`, `--gpus`, `--nodes`); a
    clear error when they do not divide."""
    if gpus < 1 or nodes < 1 or gpus % nodes:
        raise ValueError(f"--gpus {gpus} over --nodes {nodes}: both must be >= 1 and the GPUs "
                         f"must divide evenly among the nodes")
    emu = Emulation(profile, time_scale, gpus // nodes, intra_bw, cross_bw)
    emu.validate()
    emu.latency()  # a bad profile is a clear error now, not in every worker
    return emu
