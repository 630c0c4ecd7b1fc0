import json
import shutil
from importlib import resources

import pytest

from genserve.catalog import MODELS, get_model
from genserve.latency import Bandwidth, CostEstimates, LatencyModel
from genserve.request import Kind, Request
from genserve.spec import GenSpec

PROFILE_DIR = resources.files("genserve") / "data" / "profiles"


def _fwd(rows, model, size, batch):
    (r,) = [r for r in rows if (r["model"], r["size"], r["batch"]) == (model, size, batch)]
    return r["forward_ms"] / 1e3


def _blk(rows, model, size, batch, sp):
    (r,) = [r for r in rows
            if (r["model"], r["size"], r["batch"], r["sp"]) == (model, size, batch, sp)]
    return r


# ----- measured points -----

def test_sd3_512_one_request_is_forward_batch2(latency, profile_rows):
    fwd, _ = profile_rows
    expected = _fwd(fwd, "sd3-medium", "512", 2)
    assert expected == pytest.approx(0.02537, abs=1e-5)  # the documented 25.37 ms
    assert latency.step_time("sd3-medium", 1024, 1, 1) == pytest.approx(expected, rel=1e-6)


def test_flux_1024_one_request_is_forward_batch1(latency, profile_rows):
    fwd, _ = profile_rows
    expected = _fwd(fwd, "flux-dev", "1024", 1)
    assert expected == pytest.approx(0.17066, abs=1e-5)
    assert latency.step_time("flux-dev", 4096, 1, 1) == pytest.approx(expected, rel=1e-6)


def _sp1_points():
    fwd = json.loads((PROFILE_DIR / "h200_diffusers_forward.json").read_text())["rows"]
    blk = json.loads((PROFILE_DIR / "h200_dit_blocks.json").read_text())["rows"]
    tokens = {(r["model"], r["size"]): r["tokens"] for r in blk}
    out = []
    for r in fwd:
        cfg = MODELS[r["model"]].cfg_factor
        if r["batch"] % cfg == 0:
            out.append((r["model"], tokens[(r["model"], r["size"])], r["batch"] // cfg,
                        r["forward_ms"] / 1e3))
    return out


SP1_POINTS = _sp1_points()


def test_sp1_points_cover_every_model():
    # Every served model is in the shipped profile or estimated from one that is; tiny presets get
    # theirs from `genserve profile`.
    measured = {m for m, *_ in SP1_POINTS}
    assert measured == {n for n, m in MODELS.items() if not m.tiny and not m.estimate_from}
    assert {m.estimate_from for m in MODELS.values() if m.estimate_from} <= measured


@pytest.mark.parametrize("model,tokens,n,forward_s", SP1_POINTS)
def test_sp1_step_equals_forward_at_every_measured_point(latency, model, tokens, n, forward_s):
    assert latency.step_time(model, tokens, n, 1) == pytest.approx(forward_s, rel=1e-6)


@pytest.mark.parametrize("model,size,tokens,n,sp", [
    ("wan2.1-14b", "480p-81f", 32760, 1, 4),
    ("wan2.1-14b", "480p-81f", 32760, 1, 8),
    ("wan2.1-1.3b", "480p-81f", 32760, 1, 4),
    ("wan2.1-1.3b", "480p-33f", 14040, 1, 2),
    ("flux-dev", "1024", 4096, 1, 8),
    ("flux-dev", "1024", 4096, 2, 4),
    ("sd3-medium", "1024", 4096, 1, 2),
])
def test_spk_step_at_measured_point(latency, profile_rows, model, size, tokens, n, sp):
    fwd, blk = profile_rows
    batch = n * MODELS[model].cfg_factor
    forward = _fwd(fwd, model, size, batch)
    b1, bk = _blk(blk, model, size, batch, 1), _blk(blk, model, size, batch, sp)
    comm = bk["alltoall_bytes_per_layer_per_rank"] * bk["layers"] / 450e9
    expected = forward * bk["step_ms"] / b1["step_ms"] + comm
    assert comm > 0
    assert latency.step_time(model, tokens, n, sp) == pytest.approx(expected, rel=1e-6)


def test_wan14b_480p_81f_sp4_hand_numbers(latency, profile_rows):
    """The brief's worked example: one CFG request = transformer batch 2, on 4 GPUs."""
    fwd, blk = profile_rows
    forward = _fwd(fwd, "wan2.1-14b", "480p-81f", 2)
    b1 = _blk(blk, "wan2.1-14b", "480p-81f", 2, 1)
    b4 = _blk(blk, "wan2.1-14b", "480p-81f", 2, 4)
    expected = (forward * b4["step_ms"] / b1["step_ms"]
                + b4["alltoall_bytes_per_layer_per_rank"] * b4["layers"] / 450e9)
    got = latency.step_time("wan2.1-14b", 32760, 1, 4)
    assert got == pytest.approx(expected, rel=1e-6)
    # and it is a real speed-up over one GPU
    assert got < latency.step_time("wan2.1-14b", 32760, 1, 1) / 3


# ----- interpolation and extrapolation -----

@pytest.mark.parametrize("model,lo,mid,hi,n,sp", [
    ("sd3-medium", 1024, 1536, 2304, 1, 1),
    ("sd3-medium", 2304, 3000, 4096, 2, 1),
    ("flux-dev", 1024, 2000, 2304, 1, 1),
    ("wan2.1-14b", 14040, 20000, 32760, 1, 1),
    ("wan2.1-14b", 32760, 50000, 75600, 1, 4),
    ("wan2.1-1.3b", 14040, 20000, 32760, 1, 2),
])
def test_interpolated_tokens_lie_between_neighbours(latency, model, lo, mid, hi, n, sp):
    a = latency.step_time(model, lo, n, sp)
    b = latency.step_time(model, mid, n, sp)
    c = latency.step_time(model, hi, n, sp)
    assert a < c
    assert a < b < c


def test_tokens_above_range_do_not_shrink(latency):
    top = latency.step_time("wan2.1-14b", 75600, 1, 1)
    assert latency.step_time("wan2.1-14b", 100000, 1, 1) > top


def test_tokens_below_range_clamp(latency):
    assert latency.step_time("sd3-medium", 256, 1, 1) == pytest.approx(
        latency.step_time("sd3-medium", 1024, 1, 1), rel=1e-12)


@pytest.mark.parametrize("model,tokens,n_max,sp", [
    ("sd3-medium", 1024, 8, 1),    # blocks measured up to transformer batch 16 = 8 CFG requests
    ("flux-dev", 4096, 8, 1),      # up to batch 8, no CFG
    ("flux-dev", 4096, 8, 2),
    ("wan2.1-14b", 32760, 1, 1),   # up to batch 2 = 1 CFG request
    ("wan2.1-14b", 32760, 1, 4),
])
def test_batch_beyond_measured_max_scales_proportionally(latency, model, tokens, n_max, sp):
    base = latency.step_time(model, tokens, n_max, sp)
    assert latency.step_time(model, tokens, 2 * n_max, sp) == pytest.approx(2 * base, rel=1e-9)
    assert latency.step_time(model, tokens, 3 * n_max, sp) == pytest.approx(3 * base, rel=1e-9)


def test_batching_is_sublinear_inside_measured_range(latency):
    one = latency.step_time("sd3-medium", 1024, 1, 1)
    two = latency.step_time("sd3-medium", 1024, 2, 1)
    assert one < two < 2 * one


# ----- communication -----

@pytest.mark.parametrize("model,tokens,sp", [
    ("wan2.1-14b", 32760, 2), ("wan2.1-14b", 75600, 8), ("flux-dev", 4096, 4),
])
def test_cross_node_slower_for_sp_above_1(latency, model, tokens, sp):
    assert (latency.step_time(model, tokens, 1, sp, cross_node=True)
            > latency.step_time(model, tokens, 1, sp, cross_node=False))


def test_cross_node_equal_for_sp1(latency):
    assert (latency.step_time("wan2.1-14b", 32760, 1, 1, cross_node=True)
            == latency.step_time("wan2.1-14b", 32760, 1, 1, cross_node=False))


def test_communication_grows_when_bandwidth_shrinks(latency, profile_rows):
    _, blk = profile_rows
    slow = LatencyModel(bandwidth=Bandwidth(intra_node=45e9, cross_node=5e9))
    b4 = _blk(blk, "wan2.1-14b", "480p-81f", 2, 4)
    nbytes = b4["alltoall_bytes_per_layer_per_rank"] * b4["layers"]
    fast_t = latency.step_time("wan2.1-14b", 32760, 1, 4)
    slow_t = slow.step_time("wan2.1-14b", 32760, 1, 4)
    assert slow_t - fast_t == pytest.approx(nbytes / 45e9 - nbytes / 450e9, rel=1e-6)
    # cross-node on the slow fabric uses its cross_node figure
    assert (slow.step_time("wan2.1-14b", 32760, 1, 4, cross_node=True) - fast_t
            == pytest.approx(nbytes / 5e9 - nbytes / 450e9, rel=1e-6))
    # compute is untouched
    assert slow.step_time("wan2.1-14b", 32760, 1, 1) == latency.step_time("wan2.1-14b", 32760, 1, 1)


@pytest.mark.parametrize("intra,cross", [(0, 50e9), (450e9, 0), (-1, 50e9)])
def test_nonpositive_bandwidth_rejected(intra, cross):
    with pytest.raises(ValueError):
        LatencyModel(bandwidth=Bandwidth(intra_node=intra, cross_node=cross))


def test_move_time_uses_bandwidth(latency):
    r = Request("m", Kind.VIDEO, GenSpec("wan2.1-14b", 480, 832, frames=81))
    nbytes = get_model("wan2.1-14b").state_bytes(480, 832, 81)
    assert latency.move_time(r, False) == pytest.approx(0.005 + nbytes / 450e9)
    assert latency.move_time(r, True) == pytest.approx(0.005 + nbytes / 50e9)


# ----- errors -----

def test_unsupported_sp_raises(latency):
    with pytest.raises(ValueError, match="sp=8"):
        latency.step_time("wan2.1-1.3b", 32760, 1, 8)
    with pytest.raises(ValueError):
        latency.step_time("sd3-medium", 1024, 1, 3)


def test_degrees(latency):
    assert latency.degrees("wan2.1-1.3b") == (1, 2, 4)
    assert latency.degrees("wan2.1-14b") == (1, 2, 4, 8)


@pytest.mark.parametrize("n,tokens", [(0, 1024), (1, 0)])
def test_bad_batch_or_tokens_raise(latency, n, tokens):
    with pytest.raises(ValueError):
        latency.step_time("sd3-medium", tokens, n, 1)


def test_unknown_model_raises(latency):
    with pytest.raises(ValueError, match="sdxl"):
        latency.step_time("sdxl", 1024, 1, 1)


def test_unknown_profile_name_raises():
    with pytest.raises(ValueError, match="a100"):
        LatencyModel("a100")


def test_empty_profile_directory_raises(tmp_path):
    with pytest.raises(ValueError, match="no \\*_diffusers_forward.json"):
        LatencyModel(tmp_path)


# ----- profile directory -----

def _copy_profile(dst, prefix="mybox", forward_scale=1.0):
    fwd = json.loads((PROFILE_DIR / "h200_diffusers_forward.json").read_text())
    for r in fwd["rows"]:
        r["forward_ms"] *= forward_scale
    (dst / f"{prefix}_diffusers_forward.json").write_text(json.dumps(fwd))
    with (PROFILE_DIR / "h200_dit_blocks.json").open("rb") as src, \
            open(dst / f"{prefix}_dit_blocks.json", "wb") as out:
        shutil.copyfileobj(src, out)


def test_profile_directory_loads(tmp_path, latency):
    _copy_profile(tmp_path)
    lm = LatencyModel(tmp_path)
    assert set(lm.models) == set(latency.models)
    for args in [("sd3-medium", 1024, 1, 1), ("wan2.1-14b", 32760, 1, 4),
                 ("flux-dev", 3000, 3, 2)]:
        assert lm.step_time(*args) == pytest.approx(latency.step_time(*args), rel=1e-12)
    lm2 = LatencyModel(str(tmp_path))
    assert lm2.step_time("sd3-medium", 1024, 1, 1) == lm.step_time("sd3-medium", 1024, 1, 1)


def test_profile_directory_values_are_used(tmp_path, latency):
    _copy_profile(tmp_path, prefix="slowbox", forward_scale=2.0)
    lm = LatencyModel(tmp_path)
    assert lm.step_time("flux-dev", 4096, 1, 1) == pytest.approx(
        2 * latency.step_time("flux-dev", 4096, 1, 1), rel=1e-9)


# ----- standalone and cost estimates -----

@pytest.mark.parametrize("model,h,w,f,sp", [
    ("sd3-medium", 512, 512, 1, 1), ("flux-dev", 1024, 1024, 1, 2),
    ("wan2.1-14b", 480, 832, 81, 4), ("wan2.1-1.3b", 480, 832, 33, 1),
])
def test_standalone_is_encode_steps_decode(latency, model, h, w, f, sp):
    spec = get_model(model)
    r = Request("s", spec.kind, GenSpec(model, h, w, frames=f, steps=spec.steps))
    step = latency.step_time(model, spec.tokens(h, w, f), 1, sp)
    rate = 0.040 if spec.kind is Kind.IMAGE else 0.060
    expected = (latency.costs.encode_s[model] + spec.steps * step + rate * h * w * f / 1e6)
    assert latency.standalone(r, sp) == pytest.approx(expected, rel=1e-12)
    assert latency.decode_time(model, h, w, f) == pytest.approx(rate * h * w * f / 1e6)


def test_standalone_uses_custom_costs():
    costs = CostEstimates(encode_s={"sd3-medium": 1.0}, image_decode_s_per_mpix=10.0)
    lm = LatencyModel(costs=costs)
    r = Request("s", Kind.IMAGE, GenSpec("sd3-medium", 1024, 1024, steps=10))
    step = lm.step_time("sd3-medium", 4096, 1, 1)
    assert lm.standalone(r, 1) == pytest.approx(1.0 + 10 * step + 10.0 * 1024 * 1024 / 1e6)
    assert lm.encode_time("flux-dev") == costs.default_encode_s  # not in the custom dict


@pytest.mark.parametrize("kwargs", [
    dict(encode_s={"sd3-medium": -0.1}),
    dict(default_encode_s=-1.0),
    dict(image_decode_s_per_mpix=-0.01),
    dict(video_decode_s_per_mpix=-0.01),
    dict(move_overhead_s=-0.005),
])
def test_negative_cost_estimate_raises(kwargs):
    with pytest.raises(ValueError, match=">= 0"):
        CostEstimates(**kwargs).validate()
    with pytest.raises(ValueError):
        LatencyModel(costs=CostEstimates(**kwargs))


def test_default_cost_estimates_valid():
    CostEstimates().validate()


# ----- CFG split and estimated models -----

def test_cfg_split_step_is_the_half_batch_forward_on_half_the_gpus_plus_the_exchange(latency):
    """SD3 1024 as a CFG split on 2k GPUs: a batch-1 (one branch) step at Ulysses degree k plus
    the exchange of a bf16 noise prediction; never for a model without CFG or an odd count."""
    t = get_model("sd3-medium").tokens(1024, 1024)
    prof = latency.profile_of("sd3-medium")
    for k in (1, 2, 4):
        want = prof.compute_s(t, 1, k) + latency.costs.cfg_exchange_s + t * 4 * 16 * 2 / 450e9
        if k > 1:
            want += prof.alltoall_bytes(t, 1, k) / 450e9
        assert latency.step_time("sd3-medium", t, 1, 2 * k, False, True) == pytest.approx(want)
    # Two requests: each branch runs a batch of two.
    assert latency.step_time("sd3-medium", t, 2, 4, False, True) > latency.step_time(
        "sd3-medium", t, 1, 4, False, True)
    assert latency.cfg_split_sizes("flux-dev") == ()
    with pytest.raises(ValueError, match="no CFG branch"):
        latency.step_time("flux-dev", t, 1, 2, False, True)
    with pytest.raises(ValueError, match="even"):
        latency.step_time("sd3-medium", t, 1, 3, False, True)


def test_models_without_rows_are_estimated_from_their_reference_and_say_so(latency):
    """Wan2.2 A14B's experts are Wan2.1-14B's architecture: the same step times.  TI2V-5B is
    scaled by layers x hidden^2; Qwen-Image from FLUX.  `describe` marks them as estimates."""
    from genserve.latency import describe

    assert latency.estimated == {"qwen-image": "flux-dev", "wan2.2-a14b": "wan2.1-14b",
                                 "wan2.2-ti2v-5b": "wan2.1-14b", "wan2.1-i2v-14b": "wan2.1-14b"}
    t = get_model("wan2.1-14b").tokens(480, 832, 81)
    for k in (1, 4, 8):
        assert latency.step_time("wan2.2-a14b", t, 1, k) == pytest.approx(
            latency.step_time("wan2.1-14b", t, 1, k), rel=1e-9)
    a, b = get_model("wan2.2-ti2v-5b"), get_model("wan2.1-14b")
    ratio = (a.layers * a.hidden ** 2) / (b.layers * b.hidden ** 2)
    assert latency.step_time("wan2.2-ti2v-5b", t, 1, 1) == pytest.approx(
        ratio * latency.step_time("wan2.1-14b", t, 1, 1), rel=1e-9)
    text = describe(latency)
    assert "qwen-image (image): ESTIMATED from flux-dev" in text
    assert "sd3-medium (image): measured" in text and "CFG16" in text


def test_the_emulated_cost_per_quantum_is_fitted_as_fixed_plus_per_rank():
    """`emulate.calibrate.fit`: overrun = fixed + per rank beyond the first, least squares; one
    GPU count gives its mean; neither part goes below 0; the latency model charges it per GPU
    count."""
    from genserve.emulate.calibrate import fit

    got = fit([(1, 0.020), (1, 0.022), (4, 0.035), (4, 0.037), (8, 0.055)])
    assert got.fixed_s == pytest.approx(0.021145, abs=1e-5)  # by hand: my - b * mx
    assert got.per_rank_s == pytest.approx(0.1616 / 33.2, abs=1e-5)  # sxy / sxx
    assert fit([(4, 0.03), (4, 0.05)]) == type(got)(pytest.approx(0.04), 0.0)
    falling = fit([(1, 0.05), (8, 0.01)])  # a larger set cheaper: no negative per-rank cost
    assert falling.per_rank_s == 0.0 and falling.fixed_s == pytest.approx(0.03)
    assert fit([(1, 0.0), (8, 0.07)]).fixed_s >= 0.0
    lat = LatencyModel("h200", costs=got.estimates())
    assert lat.dispatch_time(4) - lat.dispatch_time() == pytest.approx(3 * got.per_rank_s)
