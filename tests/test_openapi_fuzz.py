"""`/openapi.json` describes the API it is served by: schemathesis (the schema-driven fuzzer) runs
every operation of a live `genserve serve` (tiny presets, CPU workers) with all of its checks:
statuses, content types and bodies as documented, schema-valid requests accepted, invalid ones
rejected, 405s with an `Allow` header, no 5xx.  It runs as its CLI, as a client would
(`schemathesis run URL/openapi.json --checks all`), with a fixed seed.

Generations stay cheap: a hook (`cheap`, loaded by the CLI from this module) turns each valid
size, step count, n, frame count and duration of a generated body into the smallest valid one
(an invalid value stays as it is, so a case the fuzzer meant to be rejected still is); each
operation gets a few dozen examples.  Before the declarations (issue 17) the same run found 23
unique failures in 824 cases: no request bodies, 400/401/404/413/415/429/503 undocumented,
/metrics declared JSON, 405s without `Allow`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("schemathesis")

from genserve.server.app import create_app
from genserve.server.config import ServeConfig

from _serve import Uvicorn

HERE = Path(__file__).resolve().parent
SIDE = {"/v1/images/generations": 384, "/v1/videos": 512}  # tiny-t2i, tiny-t2v: max side


def _int_in(v, lo: int, hi: int) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, str) and re.fullmatch(r"0|[1-9][0-9]{0,5}", v):
        v = int(v)
    return isinstance(v, int) and lo <= v <= hi


def _as(v, x: int):
    return str(x) if isinstance(v, str) else x


def cheap(path: str, body):
    """The body with its valid cost fields made the smallest valid ones (tiny presets)."""
    if path not in SIDE or not isinstance(body, dict):
        return body
    out = dict(body)
    if _int_in(out.get("steps"), 1, 1000):
        out["steps"] = _as(out["steps"], 1)
    if _int_in(out.get("n"), 1, 4):
        out["n"] = _as(out["n"], 1)
    frames = out.get("frames")
    if _int_in(frames, 1, 33) and (int(float(frames)) - 1) % 4 == 0:
        out["frames"] = _as(frames, 1)
    size = out.get("size")
    m = re.fullmatch(r"([1-9][0-9]*)x([1-9][0-9]*)", size) if isinstance(size, str) else None
    if m and all(16 <= int(x) <= SIDE[path] and int(x) % 16 == 0 for x in m.groups()):
        out["size"] = "16x16"
    return out


HOOKS = """
import schemathesis
from test_openapi_fuzz import cheap


@schemathesis.hook
def map_body(ctx, body):
    return cheap(ctx.operation.path, body)
"""


@pytest.fixture(scope="module")
def server(forked_worker_pools, tmp_path_factory):
    cfg = ServeConfig(workers=2, results_dir=str(tmp_path_factory.mktemp("fuzz")))
    with Uvicorn(create_app(cfg), health=True) as s:
        yield s


def run_schemathesis(url: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp / "genserve_fuzz_hooks.py").write_text(HOOKS)
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or "schemathesis"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "genserve_fuzz_hooks",
           "PYTHONPATH": os.pathsep.join([str(tmp), str(HERE), os.environ.get("PYTHONPATH", "")]),
           "NO_COLOR": "1"}
    return subprocess.run([cli, "run", f"{url}/openapi.json", "--checks", "all",
                           "--max-examples", "12", "--seed", "17", "--request-timeout", "60",
                           "--workers", "1", "--no-shrink", *args],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


def test_schemathesis_finds_nothing(server, tmp_path):
    r = run_schemathesis(server.url, tmp_path)
    out = r.stdout + r.stderr
    summary = re.search(r"(\d+) generated, .*", out)
    print(summary.group(0) if summary else out[-2000:])
    assert r.returncode == 0, out[-20000:]
    assert summary and "found" not in summary.group(0), out[-5000:]


@pytest.mark.parametrize("presets", [("tiny-t2i", "tiny-t2v"),
                                     ("tiny-t2i", "tiny-flux", "tiny-t2v", "tiny-wan22")])
def test_body_schemas_agree_with_the_validation(presets):
    """No server: the JSON body schema /openapi.json declares and `parse` + `to_spec` agree on
    every body of test_server's body strategy (valid fields, a few replaced by anything), with
    one served model of a kind or several (the schema's per-model branches)."""
    import json

    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from genserve.request import Kind
    from genserve.server.openapi import body_schema
    from genserve.server.schemas import parse, to_spec
    from genserve.server.service import ApiError
    from test_server import _KINDS, _bodies

    cfg = ServeConfig(presets=presets)
    schemas = {k: jsonschema_rs.validator_for(body_schema(k, cfg)) for k in _KINDS}
    sizes = st.sampled_from([" 64X64 ", "064x064", "00016x16", "000016x16", " auto", "auto",
                             "16x16\x1c", "16x16\ufeff", "400x16", "512x512"])

    @settings(max_examples=400, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def agree(data):
        kind = data.draw(st.sampled_from([Kind.IMAGE, Kind.VIDEO]))
        body = data.draw(_bodies(kind))
        if isinstance(body, dict) and data.draw(st.booleans()):
            body["model"] = data.draw(st.sampled_from(presets))
        if isinstance(body, dict) and data.draw(st.booleans()):
            body["size"] = data.draw(sizes)
        try:
            to_spec(parse(_KINDS[kind], json.loads(json.dumps(body)), cfg.max_prompt_chars),
                    kind, cfg.presets, cfg.max_images, cfg.fps)
            taken = True
        except ApiError:
            taken = False
        assert schemas[kind].is_valid(body) == taken, body

    agree()
