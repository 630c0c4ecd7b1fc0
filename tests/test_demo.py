"""`genserve demo`'s emulated part: one small trace on 8 emulated H200s, genserve vs the best
baseline (picked on the simulator), per model; and its flags."""

from __future__ import annotations

import re

import pytest

from genserve.cli import main
from genserve.experiment import DEFAULT_POLICIES
from genserve.server.demo import DEMO_MODELS


def test_demo_emulated_only_prints_every_model_for_both_policies(capsys):
    # A tiny trace (a few requests of each model with this seed) at a high time scale: the
    # figures mean little here, the table's shape is what is checked.
    rc = main(["demo", "--emulated-only", "--emulated-duration", "15", "--emulated-rate", "0.8",
               "--time-scale", "80", "--seed", "3"])
    out = capsys.readouterr().out
    assert rc == 0, out
    picked = re.search(r"best baseline by simulation on this trace: (\S+) \(simulated SLO "
                       r"attainment: (.*)\)", out)
    assert picked, out
    best = picked.group(1)
    baselines = [p for p in DEFAULT_POLICIES if not p.startswith("genserve")]
    assert best in baselines
    # Every baseline was simulated, and the one picked has the highest figure.
    figures = dict(re.findall(r"(\S+) ([0-9.]+)%", picked.group(2)))
    assert sorted(figures) == sorted(baselines)
    assert float(figures[best]) == max(map(float, figures.values()))

    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("model "))
    assert lines[head].split() == ["model", "requests", "genserve", "(sim)", best, "(sim)"]
    table = lines[head + 2:head + 3 + len(DEMO_MODELS)]
    rows = {line.split()[0]: line.split()[1:] for line in table}
    assert list(rows) == [*DEMO_MODELS, "overall"]
    share = r"(\d+\.\d%|-)"
    for model, cells in rows.items():
        assert len(cells) == 5, (model, cells)
        assert re.fullmatch(r"\d+", cells[0])
        for cell in (cells[1], cells[3]):
            assert re.fullmatch(share, cell), (model, cells)
        for cell in (cells[2], cells[4]):
            assert re.fullmatch(rf"\({share}\)", cell), (model, cells)
    assert sum(int(rows[m][0]) for m in DEMO_MODELS) == int(rows["overall"][0]) > 0
    assert "%" in rows["overall"][1] and "%" in rows["overall"][3]
    assert re.search(r"emulated part: [0-9.]+ s wall", out)
    assert "H200 latency profile" in out and "placeholders" in out
    # The policies plan with the engine's cost per quantum, measured on these GPUs first.
    assert re.search(r"cost per quantum measured on them: [0-9.]+ trace ms \+ [0-9.]+ per rank "
                     r"beyond the first \([0-9.]+ \+ [0-9.]+ ms wall", out)
    # The emulated part alone: no HTTP server.
    assert "server up" not in out


@pytest.mark.parametrize("args, message", [
    (["--emulated-only", "--no-emulated"], "not allowed with"),
    (["--emulated-only", "--time-scale", "0"], "must be > 0"),
    (["--emulated-only", "--emulated-duration", "-1"], "must be > 0"),
])
def test_demo_bad_flags_are_one_line_errors(capsys, args, message):
    try:
        rc = main(["demo", *args])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
