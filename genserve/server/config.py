"""`genserve serve` configuration: one dataclass, one cross-field validation."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..catalog import MODELS


@dataclass
class ServeConfig:
    # Presets the workers load (tiny random-weight ones by default: no weights needed).
    presets: tuple[str, ...] = ("tiny-t2i", "tiny-t2v")
    workers: int = 2              # with ray: 0 = one per GPU of the Ray cluster
    device: str = "cpu"
    # A Ray cluster to run the workers on ("auto": the one `ray start` made here; an address
    # host:port otherwise); None: worker processes on this machine.
    ray: str | None = None
    ray_cpus_per_worker: float = 1.0
    model_path: str | None = None
    policy: str = "genserve"
    # Latency profile the policy plans with: "measure" profiles the workers at start-up (seconds
    # for the tiny presets); otherwise a shipped profile name or a `genserve profile` directory.
    profile: str = "measure"
    host: str = "127.0.0.1"
    port: int = 8000
    # Admission: requests not yet started, per kind; beyond them a 429 with Retry-After.
    max_waiting_images: int = 64
    max_waiting_videos: int = 16
    # Deadline when the client gives none: arrival + slo_scale x the request's standalone time.
    slo_scale: float = 3.0
    # A request whose deadline cannot be met even alone: "reject" (422, reason) or "best_effort".
    infeasible: str = "best_effort"
    api_keys: tuple[str, ...] = ()
    results_dir: str = "genserve-results"
    result_ttl_s: float = 3600.0
    drain_timeout_s: float = 60.0
    max_prompt_chars: int = 2000
    max_images: int = 4           # n per image request
    fps: int = 16                 # frames per second of the videos (Wan2.1: 16)
    # Every this many steps a request's state is copied to the driver and written to
    # results_dir, so a restarted server resumes it there (0: never).
    checkpoint_every: int = 4
    # The policy's step times correct themselves from the quanta the workers run
    # (`genserve.feedback.Corrected`): the profile drifts from the hardware, the load, the drivers.
    latency_feedback: bool = True
    # A worker silent (no heartbeat, or no step progress on a job) this long is declared lost,
    # killed and replaced.  None: a few times the longest profiled step, at least 60 s.
    worker_timeout_s: float | None = None
    # Request bodies: JSON up to max_body_bytes, uploaded files up to max_upload_bytes (413).
    max_body_bytes: int = 1 << 20
    max_upload_bytes: int = 64 << 20
    defaults: dict = field(default_factory=dict)  # model -> (height, width, frames, steps)
    # Emulated GPUs (`genserve.emulate`): the latency profile their timings come from (a shipped
    # name such as "h200", or a directory); `workers` is then the number of GPUs.  None: real
    # workers.
    emulate: str | None = None
    # GPUs per node: the topology the policy plans on (and, emulated, what a move across costs).
    gpus_per_node: int = 8
    # Emulated only: everything runs this many times faster (steps, deadlines, the clock).
    time_scale: float = 1.0

    def validate(self) -> None:
        unknown = [p for p in self.presets if p not in MODELS]
        problems = []
        if not self.presets or unknown:
            problems.append(f"presets {list(self.presets)}: unknown {unknown}; known: "
                            f"{', '.join(MODELS)}")
        if self.workers < (0 if self.ray and self.device != "cpu" else 1):
            problems.append(f"workers={self.workers}: must be >= 1"
                            + (" (0: every GPU of the Ray cluster)" if self.ray else ""))
        if self.ray is not None and not self.ray.strip():
            problems.append("ray: an address (host:port) or 'auto'")
        if self.ray_cpus_per_worker <= 0:
            problems.append(f"ray_cpus_per_worker={self.ray_cpus_per_worker}: must be > 0")
        if not 0 < self.port < 65536:
            problems.append(f"port={self.port}: must be in 1..65535")
        if self.max_waiting_images < 1 or self.max_waiting_videos < 1:
            problems.append("max waiting images/videos must be >= 1")
        if self.slo_scale <= 0:
            problems.append(f"slo_scale={self.slo_scale}: must be > 0")
        if self.infeasible not in ("reject", "best_effort"):
            problems.append(f"infeasible={self.infeasible!r}: 'reject' or 'best_effort'")
        if self.result_ttl_s <= 0 or self.drain_timeout_s < 0:
            problems.append("result_ttl_s must be > 0 and drain_timeout_s >= 0")
        if self.max_prompt_chars < 1 or self.max_images < 1 or self.fps < 1:
            problems.append("max_prompt_chars, max_images and fps must be >= 1")
        if self.checkpoint_every < 0:
            problems.append(f"checkpoint_every={self.checkpoint_every}: must be >= 0")
        if self.worker_timeout_s is not None and not self.worker_timeout_s > 0:
            problems.append(f"worker_timeout_s={self.worker_timeout_s}: must be > 0")
        if self.max_body_bytes < 1024 or self.max_upload_bytes < self.max_body_bytes:
            problems.append(f"max_body_bytes={self.max_body_bytes} must be >= 1024 and "
                            f"max_upload_bytes={self.max_upload_bytes} >= it")
        if any(not k for k in self.api_keys):
            problems.append("api keys must be non-empty")
        if self.emulate is not None and (self.ray or self.model_path):
            problems.append("emulate: emulated GPUs run on this machine, without --ray or "
                            "--model-path")
        if self.gpus_per_node < 1:
            problems.append(f"gpus_per_node={self.gpus_per_node}: must be >= 1")
        if not self.time_scale > 0 or (self.time_scale != 1.0 and self.emulate is None):
            problems.append(f"time_scale={self.time_scale}: must be > 0, and only emulated GPUs "
                            f"run at another speed than 1")
        if problems:
            raise ValueError("serve config: " + "; ".join(problems))
