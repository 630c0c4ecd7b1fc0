"""`genserve profile` on the tiny presets: files in the shipped format that LatencyModel reads.

The `--workers` run forks its workers from the tests' fork server (conftest `forked_worker_pools`)
rather than spawning them: the same worker code, without importing torch and diffusers again."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from genserve.cli import main  # noqa: E402
from genserve.latency import LatencyModel  # noqa: E402
from genserve.workload import default_mix  # noqa: E402
from genserve.spec import GenSpec  # noqa: E402


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("prof")
    assert main(["profile", "--models", "tiny-t2i,tiny-t2v", "--out", str(out), "--name", "cpu",
                 "--reps", "1", "--batches", "1,2,4"]) == 0
    return out


def test_profile_files_load_and_predict_what_was_measured(profile_dir):
    fwd = json.loads((profile_dir / "cpu_diffusers_forward.json").read_text())
    blk = json.loads((profile_dir / "cpu_dit_blocks.json").read_text())
    rows = {(r["model"], r["size"], r["batch"]): r["forward_ms"] for r in fwd["rows"]}
    # CFG models are measured at even transformer batches only (one request = batch 2).
    assert ("tiny-t2i", "64x64x1", 1) not in rows and ("tiny-t2i", "64x64x1", 2) in rows
    assert {r["sp"] for r in blk["rows"]} == {1}
    lat = LatencyModel(profile_dir)
    assert lat.degrees("tiny-t2i") == (1,)
    # One CFG request = the measured forward at batch 2 (calibration is 1 by construction).
    assert lat.step_time("tiny-t2i", 256, 1, 1) == pytest.approx(
        rows[("tiny-t2i", "64x64x1", 2)] / 1e3)
    assert lat.step_time("tiny-t2v", 12, 2, 1) == pytest.approx(
        rows[("tiny-t2v", "32x32x9", 4)] / 1e3)
    meta = fwd["meta"]
    assert lat.encode_time("tiny-t2v") == pytest.approx(meta["encode_ms"]["tiny-t2v"] / 1e3)
    assert lat.decode_time("tiny-t2v", 32, 32, 9) == pytest.approx(
        meta["decode_ms"]["tiny-t2v@32x32x9"] / 1e3)


def test_simulate_a_tiny_mix_with_the_measured_profile(profile_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["simulate", "--profile", str(profile_dir), "--mix",
                 "tiny-t2i@64x64=4,tiny-t2v@32x32x9=1", "--rate", "5", "--duration", "30",
                 "--gpus", "4", "--policy", "fcfs,genserve", "--jobs", "1", "--json",
                 str(out)]) == 0
    res = json.loads(out.read_text())["policies"]
    assert res["genserve"]["count"] == res["fcfs"]["count"] > 0


def test_profile_rejects_bad_arguments(tmp_path, capsys):
    assert main(["profile", "--models", "nope", "--out", str(tmp_path)]) == 2
    assert main(["profile", "--models", "tiny-t2i", "--out", str(tmp_path), "--reps", "0"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_tiny_presets_stay_out_of_default_mixes():
    assert not any(it.model.startswith("tiny") for it in default_mix(0.5))


def test_profile_on_workers_measures_the_dispatch_cost_the_simulator_charges(tmp_path,
                                                                           forked_worker_pools):
    from genserve.catalog import get_model
    from genserve.policies import Assignment, Cluster, Plan, Policy
    from genserve.request import Kind, Request
    from genserve.sim import Simulator

    assert main(["profile", "--models", "tiny-t2i", "--out", str(tmp_path), "--reps", "1",
                 "--batches", "2", "--workers", "2"]) == 0
    meta = json.loads((tmp_path / "local_diffusers_forward.json").read_text())["meta"]
    assert meta["workers"] == 2 and "1 threads" in meta["device"]
    assert 0 < meta["dispatch_ms"] < 1000
    lat = LatencyModel(tmp_path)
    assert lat.dispatch_time() == pytest.approx(meta["dispatch_ms"] / 1e3)

    class Once(Policy):
        name = "once"

        def schedule(self, s):
            return Plan([Assignment((0,), (s.queue[0].id,), 3)])

    r = Request("a", Kind.IMAGE, GenSpec("tiny-t2i", 64, 64, steps=3))
    Simulator(Cluster(1), lat, Once()).run([r])
    tokens = get_model("tiny-t2i").tokens(64, 64, 1)
    assert r.finish_time == pytest.approx(lat.dispatch_time() + lat.encode_time("tiny-t2i")
                                          + 3 * lat.step_time("tiny-t2i", tokens)
                                          + lat.decode_time("tiny-t2i", 64, 64))
