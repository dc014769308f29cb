"""``longattn bench parallel`` and ``torchrun -m longattn.parallel.bench`` on tiny sizes.

The launcher starts real gloo ranks; each run here is a few seconds. What is
checked is exact: the bytes every rank measured equal the analytical count,
every exact method's output equals zigzag's, every metric is present and
sane, the targets are evaluated, and bad arguments are refused by name.
Timing figures are not asserted (benchmarks measure, tests do not).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from longattn.bench.parallel import METHODS, run
from longattn.cli import main
from longattn.errors import ArgumentError
from longattn.parallel.cost_model import get_preset, save_profile

ROOT = Path(__file__).resolve().parents[1]


def _check_world(res: dict, world: int, tokens: int) -> None:
    assert res["world"] == world and res["tokens"] == tokens
    assert set(res["methods"]) == set(METHODS)
    for m, row in res["methods"].items():
        for name in ("wall", "compute", "compute_cpu", "wait", "bytes", "messages", "overlap"):
            assert len(row[name]) == world, (m, name)
        assert row["bytes"] == row["bytes_analytical"], (m, row["bytes"], row["bytes_analytical"])
        assert all(c > 0 for c in row["compute"]), (m, row["compute"])
        if m != "apb":
            assert row["max_abs_diff_vs_zigzag"] < 1e-4, (m, row["max_abs_diff_vs_zigzag"])
    assert 0 <= res["apb_rel_error"] < res["apb_rel_error_no_passing"] or world == 1
    assert {t["what"].split(" ")[0] for t in res["targets"]} >= {"zigzag"}


@pytest.mark.timeout(300)
def test_launcher_runs_every_method_and_counts_bytes_exactly(tmp_path, capsys):
    profile = tmp_path / "profile.json"
    save_profile(get_preset("h100-nvlink"), profile)  # any valid profile: the plumbing of predictions
    report = run(worlds=(1, 2), tokens=256, out_dir=str(tmp_path), profile=str(profile))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["world"] for r in summary] == [1, 2]
    for res in summary:
        _check_world(res, res["world"], 256)
    world2 = summary[1]
    assert any("APB >= 1.1x" in t["what"] for t in world2["targets"])
    assert any("simulator within 25%" in t["what"] for t in world2["targets"])
    assert all(row["predicted_s"] > 0 for row in world2["methods"].values())
    assert "world 2" in report and "target:" in report and str(tmp_path) in report


@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun is not installed next to this python")
def test_torchrun_entry_point(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([torchrun, "--nproc-per-node", "2", "-m", "longattn.parallel.bench", "--tokens", "128",
                           "--methods", "zigzag,apb", "--out", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "world2.json").read_text())
    assert set(res["methods"]) == {"zigzag", "apb"} and res["tokens"] == 128


@pytest.mark.parametrize("argv,words", [
    (["bench", "parallel", "--world", "0"], ["--world"]),
    (["bench", "parallel", "--sizes", "256,512"], ["--sizes", "one"]),
    (["bench", "parallel", "--sizes", "100", "--world", "4"], ["multiple", "8"]),
    (["bench", "parallel", "--methods", "ring,flash"], ["--methods"]),
    (["bench", "dense", "--world", "2"], ["--world", "parallel"]),
])
def test_bad_arguments_exit_2_naming_the_option(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, err


def test_run_refuses_bad_repeats():
    with pytest.raises(ArgumentError, match="repeats"):
        run(worlds=(2,), tokens=64, repeats=0)
