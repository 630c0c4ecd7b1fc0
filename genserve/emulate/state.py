"""An emulated request's step state: what a real one would weigh, and what it has been through.

A real state holds the latents (fp32, the model's latent geometry) and the prompt embeddings
(bf16, conditional and, under classifier-free guidance, unconditional).  An emulated one holds a
payload of exactly those bytes (zeros: nothing reads them) so that moves, checkpoints and
transfers carry real sizes, plus what makes its output: the spec, the step reached, and a digest
chained over the steps taken.  The digest depends on the spec and the number of steps only, so a
request paused, moved, checkpointed or restarted anywhere ends with the digest of one that ran
straight through: the emulated form of a bit-identical resume, and what its output shows.

Resident payloads are `bytes(n)`: zero pages the kernel maps lazily, so hundreds of paused
states cost no memory until they travel (then they are real bytes, copied like real ones).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
from dataclasses import asdict, dataclass

from ..catalog import get_model, uses_cfg
from ..spec import GenSpec

MAGIC = b"GSEMU1\n"
_LEN = struct.Struct("!I")


def tensor_shapes(spec: GenSpec) -> dict[str, tuple[tuple[int, ...], str]]:
    """The real model's step-state tensors for `spec`: name -> (shape, dtype)."""
    m = get_model(spec.model)
    latents = (1, m.latent_channels, m.latent_frames(spec.frames),
               spec.height // m.vae_spatial, spec.width // m.vae_spatial)
    shapes = {"latents": (latents, "float32"), "cond": ((1, m.text_tokens, m.text_dim), "bfloat16")}
    if uses_cfg(spec.model, spec.guidance):
        shapes["uncond"] = ((1, m.text_tokens, m.text_dim), "bfloat16")
    return shapes


_ITEM = {"float32": 4, "bfloat16": 2}


def payload_bytes(spec: GenSpec) -> int:
    n = 0
    for shape, dtype in tensor_shapes(spec).values():
        size = _ITEM[dtype]
        for d in shape:
            size *= d
        n += size
    return n


def first_digest(spec: GenSpec) -> bytes:
    """What an output depends on: the spec (seed and prompts included), never the request id."""
    return hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).digest()


@dataclass
class EmuState:
    request_id: str
    spec: GenSpec
    step_index: int
    digest: bytes
    payload: bytes

    @classmethod
    def new(cls, request_id: str, spec: GenSpec) -> "EmuState":
        return cls(request_id, spec, 0, first_digest(spec), bytes(payload_bytes(spec)))

    @property
    def model(self) -> str:
        return self.spec.model

    @property
    def done(self) -> bool:
        return self.step_index >= self.spec.steps

    @property
    def shape_key(self) -> tuple:
        return self.spec.batch_key

    def step(self) -> None:
        if self.done:
            raise ValueError(f"{self.request_id}: all {self.spec.steps} steps are done")
        self.digest = hashlib.sha256(self.digest + self.step_index.to_bytes(4, "big")).digest()
        self.step_index += 1

    def advance_to(self, step_index: int) -> None:
        """Take the steps another member of the job took (an SP group's members agree)."""
        while self.step_index < step_index:
            self.step()

    def to_bytes(self) -> bytes:
        """The whole state: header and payload (a checkpoint, a fetch)."""
        return b"".join((self.header(), self.payload))

    def header(self) -> bytes:
        """The state without its payload: what another emulated worker needs to go on (its
        payload travels apart, see `exchange.py`); `from_bytes(header, payload_apart=True)`."""
        head = pickle.dumps({"request_id": self.request_id, "spec": self.spec,
                             "step_index": self.step_index, "digest": self.digest,
                             "shapes": tensor_shapes(self.spec)},
                            protocol=pickle.HIGHEST_PROTOCOL)
        return b"".join((MAGIC, _LEN.pack(len(head)), head))

    @classmethod
    def from_bytes(cls, blob: bytes, payload_apart: bool = False) -> "EmuState":
        """The state back; ValueError if `blob` is not a whole emulated state (or, with
        `payload_apart`, a whole header)."""
        if not is_emulated(blob):
            raise ValueError("not an emulated state (no GSEMU1 header)")
        at = len(MAGIC) + _LEN.size
        try:  # a header cut short or damaged is not a state either
            (n,) = _LEN.unpack_from(blob, len(MAGIC))
            head = pickle.loads(blob[at:at + n])
            rid, spec, step, digest = (head[k] for k in ("request_id", "spec", "step_index",
                                                         "digest"))
        except Exception as e:  # noqa: BLE001 - struct, pickle, key or type errors alike
            raise ValueError(f"emulated state with a damaged header ({type(e).__name__}: "
                             f"{e})") from None
        if not isinstance(spec, GenSpec):
            raise ValueError(f"emulated state of {rid!r}: no spec")
        size, want = len(blob) - at - n, payload_bytes(spec)
        if payload_apart and size == 0:
            size = want
        elif size != want:
            raise ValueError(f"emulated state of {rid!r}: payload of {size} bytes, expected "
                             f"{want}")
        # The bytes travelled; the resident copy is zero pages again (see the module doc).
        return cls(rid, spec, step, digest, bytes(size))


def is_emulated(blob: bytes) -> bool:
    return blob[:len(MAGIC)] == MAGIC


def identity(blob: bytes) -> tuple[str, int]:
    """(request id, step index) of a saved state, emulated or real (a restarted server checks
    its checkpoints with this)."""
    if is_emulated(blob):
        st = EmuState.from_bytes(blob)
        return st.request_id, st.step_index
    from ..models.base import StepState  # torch: real states only

    st = StepState.from_bytes(blob)
    return st.request_id, st.step_index
