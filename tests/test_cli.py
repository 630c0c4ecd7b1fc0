import json

import pytest

from genserve.cli import main, split_policies

SHORT = ["--rate", "0.05", "--duration", "600", "--jobs", "1"]


def _run(args, capsys):
    try:
        rc = main(args)
    except SystemExit as e:  # argparse errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line_error(rc, err):
    assert rc == 2
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and "error" in lines[0], err


# ----- simulate -----

def test_simulate_bound_and_the_bound_command(tmp_path, capsys):
    j = tmp_path / "out.json"
    rc, out, err = _run(["simulate", *SHORT, "--policy", "fcfs,genserve", "--bound", "--json",
                         str(j)], capsys)
    assert rc == 0, err
    assert "upper bound (no policy meets more)" in out and "share of the bound: fcfs" in out
    d = json.loads(j.read_text())
    b = d["bound"]
    assert b["count"] == d["policies"]["fcfs"]["count"]
    assert b["slo_attainment"] >= max(p["slo_attainment"] for p in d["policies"].values())
    rc, out2, err = _run(["bound", *SHORT[:4], "--json", str(j)], capsys)
    assert rc == 0, err
    again = json.loads(j.read_text())["bound"]
    assert {**again, "seconds": 0} == {**b, "seconds": 0}
    rc, out, err = _run(["simulate", *SHORT, "--policy", "genserve", "--profile-error", "0.7",
                         "--feedback"], capsys)
    assert rc == 0, err


def test_simulate_prints_table_and_writes_json(tmp_path, capsys):
    j = tmp_path / "out.json"
    rc, out, err = _run(["simulate", *SHORT, "--policy", "fcfs,genserve", "--json", str(j)],
                        capsys)
    assert rc == 0, err
    assert "policy" in out and "SLO" in out
    table_rows = [l.split()[0] for l in out.splitlines() if l.split()]
    assert "fcfs" in table_rows and "genserve" in table_rows
    assert f"wrote {j}" in out
    d = json.loads(j.read_text())
    assert set(d) == {"config", "policies"}
    assert d["config"]["workload"]["rate"] == 0.05
    assert d["config"]["workload"]["duration"] == 600.0
    assert d["config"]["gpus"] == 8
    assert list(d["policies"]) == ["fcfs", "genserve"]
    for name, m in d["policies"].items():
        assert isinstance(m["slo_attainment"], float)
        assert 0.0 <= m["slo_attainment"] <= 1.0
        assert m["count"] > 0
        for kind in ("image", "video"):
            assert "slo_attainment" in m[kind]
            assert m[kind]["count"] >= 0
        assert m["image"]["count"] + m["video"]["count"] == m["count"]
        assert m["image"]["met"] + m["video"]["met"] == m["met"]


def test_simulate_is_deterministic(tmp_path, capsys):
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for p in paths:
        rc, _, err = _run(["simulate", *SHORT, "--seed", "3", "--policy", "fcfs,genserve",
                           "--json", str(p)], capsys)
        assert rc == 0, err
    a, b = (json.loads(p.read_text()) for p in paths)
    assert a == b
    # and the seed matters
    c = tmp_path / "c.json"
    assert _run(["simulate", *SHORT, "--seed", "4", "--policy", "fcfs,genserve",
                 "--json", str(c)], capsys)[0] == 0
    assert json.loads(c.read_text())["policies"] != a["policies"]


def test_simulate_parallel_jobs_match_serial(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    base = ["simulate", "--rate", "0.05", "--duration", "300", "--policy", "fcfs,edf"]
    assert _run([*base, "--jobs", "1", "--json", str(a)], capsys)[0] == 0
    assert _run([*base, "--jobs", "2", "--json", str(b)], capsys)[0] == 0
    assert json.loads(a.read_text()) == json.loads(b.read_text())


@pytest.mark.parametrize("args,needle", [
    (["--rate", "-1"], "rate"),
    (["--rate", "0"], "rate"),
    (["--policy", "nosuch"], "nosuch"),
    (["--policy", "fcfs:bogus=1"], "bogus"),
    (["--policy", "fcfs,genserve:bogus=1"], "bogus"),
    (["--policy", ","], "policy"),
    (["--mix", "sd3-medium@512"], "mix"),
    (["--mix", "sd3-medium@500x512=1"], "width"),
    (["--mix", "sd3-medium@512x512=0"], "weight"),
    (["--gpus", "0"], "gpus"),
    (["--gpus-per-node", "0"], "gpus"),
    (["--video-share", "1.5"], "video_share"),
    (["--intra-bw", "0"], "bandwidth"),
    (["--horizon", "100", "--drain"], "horizon"),
    (["--trace", "/nonexistent/dir/t.jsonl"], "nonexistent"),
    (["--profile-error", "sd3-medium=fast"], "profile error"),
    (["--profile-error", "0"], "> 0"),
])
def test_simulate_bad_options_exit_2(args, needle, capsys):
    rc, out, err = _run(["simulate", "--duration", "300", "--jobs", "1", *args], capsys)
    _assert_one_line_error(rc, err)
    assert needle in err
    assert "policy " not in out  # no table


@pytest.mark.parametrize("args", [
    ["simulate", "--rate", "abc"],
    ["simulate", "--arrival", "uniform"],
    ["simulate", "--gpus", "two"],
    ["simulate", "--no-such-flag"],
    ["sweep", "--values", "a,b"],
    ["sweep", "--over", "gpus", "--values", "1"],
    ["sweep"],                      # --values required
    ["trace"],                      # --out required
    ["frobnicate"],
    [],
])
def test_argparse_errors_exit_2_with_one_line(args, capsys):
    rc, _, err = _run(args, capsys)
    _assert_one_line_error(rc, err)


# ----- trace -> simulate --trace -----

def test_trace_then_simulate_trace(tmp_path, capsys):
    t = tmp_path / "f.jsonl"
    rc, out, err = _run(["trace", "--rate", "0.05", "--duration", "600", "--seed", "2",
                         "--out", str(t)], capsys)
    assert rc == 0, err
    assert f"wrote {t}" in out
    lines = t.read_text().splitlines()
    meta = json.loads(lines[0])["meta"]
    assert meta["workload"]["workload"]["rate"] == 0.05
    n = len(lines) - 1
    assert n > 5 and f"{n} requests" in out

    j1, j2 = tmp_path / "from_trace.json", tmp_path / "direct.json"
    rc, out, err = _run(["simulate", "--trace", str(t), "--policy", "fcfs", "--jobs", "1",
                         "--json", str(j1)], capsys)
    assert rc == 0, err
    d = json.loads(j1.read_text())
    assert d["config"]["trace"] == str(t)
    assert "workload" not in d["config"]
    assert d["policies"]["fcfs"]["count"] == n
    # replaying the trace gives the same results as generating the same workload directly
    rc, _, err = _run(["simulate", "--rate", "0.05", "--duration", "600", "--seed", "2",
                       "--policy", "fcfs", "--jobs", "1", "--json", str(j2)], capsys)
    assert rc == 0, err
    assert d["policies"] == json.loads(j2.read_text())["policies"]


def test_simulate_bad_trace_exit_2(tmp_path, capsys):
    t = tmp_path / "bad.jsonl"
    t.write_text('{"meta": {}}\n{oops\n')
    rc, _, err = _run(["simulate", "--trace", str(t), "--policy", "fcfs", "--jobs", "1"], capsys)
    _assert_one_line_error(rc, err)
    assert f"{t}:2" in err


# ----- sweep -----

def test_sweep_tune_writes_json_and_plot(tmp_path, capsys):
    j, p = tmp_path / "j.json", tmp_path / "p.png"
    rc, out, err = _run(["sweep", "--over", "rate", "--values", "0.02,0.05", "--duration", "600",
                         "--policy", "fcfs,static", "--tune", "--jobs", "1",
                         "--json", str(j), "--plot", str(p)], capsys)
    assert rc == 0, err
    assert "== rate = 0.02" in out and "== rate = 0.05" in out
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    d = json.loads(j.read_text())
    assert d["over"] == "rate" and d["tune"] is True
    assert [pt["rate"] for pt in d["points"]] == [0.02, 0.05]
    for pt in d["points"]:
        assert set(pt["policies"]) == {"fcfs", "static"}
        for name, m in pt["policies"].items():
            assert m["param"].partition(":")[0] == name
            assert isinstance(m["slo_attainment"], float)
        assert pt["policies"]["static"]["param"].startswith("static:image_gpus=")


def test_sweep_without_tune_reports_plain_names(tmp_path, capsys):
    j = tmp_path / "j.json"
    rc, _, err = _run(["sweep", "--over", "slo-scale", "--values", "1.5,3", "--rate", "0.05",
                       "--duration", "300", "--policy", "fcfs", "--jobs", "1", "--json", str(j)],
                      capsys)
    assert rc == 0, err
    d = json.loads(j.read_text())
    assert d["over"] == "slo_scale" and d["tune"] is False
    assert [pt["slo_scale"] for pt in d["points"]] == [1.5, 3.0]
    assert all(pt["policies"]["fcfs"]["param"] == "fcfs" for pt in d["points"])
    # a looser SLO cannot lower attainment on the same arrivals with FCFS
    a, b = (pt["policies"]["fcfs"]["slo_attainment"] for pt in d["points"])
    assert b >= a


# ----- policy list parsing -----

@pytest.mark.parametrize("text,expected", [
    ("a,b:x=1,y=2,c", ["a", "b:x=1,y=2", "c"]),
    ("fcfs", ["fcfs"]),
    ("fcfs, edf ,", ["fcfs", "edf"]),
    ("a;b:x=1;y=2", ["a", "b:x=1,y=2"]),
    ("b:,x=1", ["b:x=1"]),
    ("static:image_gpus=2,order=edf,genserve", ["static:image_gpus=2,order=edf", "genserve"]),
    ("", []),
])
def test_split_policies(text, expected):
    assert split_policies(text) == expected


# ----- serve --ray: bad settings are one-line errors before anything starts -----

@pytest.mark.parametrize("args, needle", [
    (["--ray", "auto"], "workers=0: must be >= 1"),            # CPU workers need a count
    (["--ray", " ", "--workers", "2"], "ray: an address"),
    (["--ray", "auto", "--workers", "2", "--ray-cpus-per-worker", "0"], "ray_cpus_per_worker"),
    (["--workers", "0"], "workers=0: must be >= 1"),
])
def test_serve_ray_settings_are_checked_first(args, needle, capsys):
    rc, out, err = _run(["serve", *args], capsys)
    _assert_one_line_error(rc, err)
    assert needle in err


def test_serve_config_ray_defaults_to_every_gpu():
    from genserve.server.config import ServeConfig

    ServeConfig(ray="auto", device="cuda", workers=0).validate()  # 0: every GPU of the cluster
    with pytest.raises(ValueError, match="workers=-1"):
        ServeConfig(ray="auto", device="cuda", workers=-1).validate()


def test_profile_show_prints_the_table_and_marks_estimates(capsys):
    rc, out, err = _run(["profile", "--show", "h200"], capsys)
    assert rc == 0, err
    assert "wan2.2-a14b (video): ESTIMATED from wan2.1-14b" in out
    assert "flux-dev (image): measured" in out
    rc, out, err = _run(["profile"], capsys)  # neither --out nor --show
    _assert_one_line_error(rc, err)
    assert "--out" in err
