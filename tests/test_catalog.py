import pytest

from genserve.catalog import MODELS, ShapeError, get_model
from genserve.request import Kind


@pytest.mark.parametrize("model,h,w,f,tokens", [
    ("sd3-medium", 512, 512, 1, 1024),
    ("sd3-medium", 768, 768, 1, 2304),
    ("sd3-medium", 1024, 1024, 1, 4096),
    ("flux-dev", 1024, 1024, 1, 4096),
    ("wan2.1-14b", 480, 832, 81, 32760),
    ("wan2.1-14b", 720, 1280, 81, 75600),
    ("wan2.1-14b", 480, 832, 33, 14040),
    ("wan2.1-1.3b", 480, 832, 33, 14040),
    ("wan2.1-1.3b", 480, 832, 81, 32760),
])
def test_tokens_match_profile(model, h, w, f, tokens):
    assert get_model(model).tokens(h, w, f) == tokens


def test_tokens_match_every_profile_row(profile_rows):
    """Every block row's token count follows from its size label and the catalog geometry."""
    sizes = {"512": (512, 512, 1), "768": (768, 768, 1), "1024": (1024, 1024, 1),
             "480p-33f": (480, 832, 33), "480p-81f": (480, 832, 81), "720p-81f": (720, 1280, 81)}
    _, blk = profile_rows
    assert blk
    for r in blk:
        h, w, f = sizes[r["size"]]
        assert MODELS[r["model"]].tokens(h, w, f) == r["tokens"], r


def test_image_tokens_ignore_frames_and_video_latent_frames():
    assert get_model("sd3-medium").latent_frames(1) == 1
    assert get_model("wan2.1-14b").latent_frames(81) == 21
    assert get_model("wan2.1-14b").latent_frames(1) == 1


def test_kinds_and_cfg():
    assert get_model("sd3-medium").kind is Kind.IMAGE and get_model("sd3-medium").cfg_factor == 2
    assert get_model("flux-dev").kind is Kind.IMAGE and get_model("flux-dev").cfg_factor == 1
    assert get_model("wan2.1-14b").kind is Kind.VIDEO


@pytest.mark.parametrize("model,h,w,f", [
    ("sd3-medium", 512, 512, 1), ("sd3-medium", 1024, 768, 1), ("flux-dev", 1024, 1024, 1),
    ("wan2.1-14b", 480, 832, 81), ("wan2.1-14b", 720, 1280, 81), ("wan2.1-1.3b", 480, 832, 33),
    ("wan2.1-1.3b", 480, 832, 1),
])
def test_valid_shapes_pass(model, h, w, f):
    get_model(model).validate_shape(h, w, f, steps=28)


@pytest.mark.parametrize("model,kwargs,field", [
    ("sd3-medium", dict(height=500, width=512), "height"),
    ("sd3-medium", dict(height=512, width=520), "width"),
    ("sd3-medium", dict(height=512, width=8), "width"),          # multiple of 8 but not 16
    ("sd3-medium", dict(height=64, width=512), "height"),        # below min side
    ("sd3-medium", dict(height=4096, width=512), "height"),      # above max side
    ("sd3-medium", dict(height=512.0, width=512), "height"),     # not an int
    ("wan2.1-14b", dict(height=480, width=830, frames=81), "width"),
    ("wan2.1-14b", dict(height=480, width=832, frames=80), "frames"),
    ("wan2.1-14b", dict(height=480, width=832, frames=82), "frames"),
    ("wan2.1-14b", dict(height=480, width=832, frames=0), "frames"),
    ("wan2.1-14b", dict(height=480, width=832, frames=165), "frames"),  # 4k+1 but > max
    ("wan2.1-1.3b", dict(height=480, width=832, frames=34), "frames"),
    ("sd3-medium", dict(height=512, width=512, frames=2), "frames"),
    ("flux-dev", dict(height=1024, width=1024, frames=81), "frames"),
    ("sd3-medium", dict(height=512, width=512, steps=0), "steps"),
    ("sd3-medium", dict(height=512, width=512, steps=-3), "steps"),
    ("wan2.1-14b", dict(height=480, width=832, frames=81, steps=0), "steps"),
])
def test_bad_shapes_name_the_field(model, kwargs, field):
    with pytest.raises(ShapeError, match=rf"^{field}=") as ei:
        get_model(model).validate_shape(**kwargs)
    assert isinstance(ei.value, ValueError)
    assert model in str(ei.value) or field == "steps"


def test_unknown_model_lists_known():
    with pytest.raises(ShapeError) as ei:
        get_model("sdxl")
    msg = str(ei.value)
    assert "sdxl" in msg
    for name in ("sd3-medium", "flux-dev", "wan2.1-1.3b", "wan2.1-14b"):
        assert name in msg


@pytest.mark.parametrize("model,h,w,f,gpus,sp", [
    ("sd3-medium", 512, 512, 1, 8, 1),
    ("sd3-medium", 1024, 1024, 1, 8, 1),
    ("flux-dev", 1024, 1024, 1, 8, 1),
    ("wan2.1-1.3b", 480, 832, 33, 8, 1),
    ("wan2.1-1.3b", 480, 832, 81, 8, 2),
    ("wan2.1-14b", 480, 832, 33, 8, 4),
    ("wan2.1-14b", 480, 832, 81, 8, 4),
    ("wan2.1-14b", 720, 1280, 81, 8, 8),
    # capped by the cluster, and rounded down to an allowed degree
    ("wan2.1-14b", 720, 1280, 81, 2, 2),
    ("wan2.1-14b", 720, 1280, 81, 3, 2),
    ("wan2.1-14b", 720, 1280, 81, 4, 4),
    ("wan2.1-14b", 480, 832, 81, 1, 1),
    ("wan2.1-1.3b", 480, 832, 81, 1, 1),
    ("sd3-medium", 512, 512, 1, 0, 1),
])
def test_default_sp(model, h, w, f, gpus, sp):
    assert get_model(model).default_sp(h, w, f, gpus) == sp


def test_default_sp_never_exceeds_allowed_degrees():
    # wan2.1-1.3b has 12 heads: 8 is never a degree, even for a huge request on 16 GPUs
    spec = get_model("wan2.1-1.3b")
    assert 8 not in spec.sp_degrees
    assert spec.default_sp(720, 1280, 161, 16) in spec.sp_degrees


def test_state_bytes_grow_with_frames():
    spec = get_model("wan2.1-14b")
    assert spec.state_bytes(480, 832, 81) > spec.state_bytes(480, 832, 33) > 0
