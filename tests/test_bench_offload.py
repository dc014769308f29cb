"""``longattn bench offload`` on a tiny context: every row runs on real files, outputs match in-memory decode.

Timing figures are not asserted (benchmarks measure, tests do not); what is
checked is exact or a correctness bound: every tier's output against
``decode_attention`` on an in-memory cache, the bytes the disk row read (the
whole KV once per step), the targets listed (the sparse one as not run).
"""

from __future__ import annotations

import json

import pytest

from longattn.bench.offload import run
from longattn.cli import main
from longattn.errors import ArgumentError


@pytest.mark.timeout(120)
def test_offload_bench_rows_and_targets(tmp_path):
    report = run(tokens=2048, repeats=2, out_dir=str(tmp_path))
    res = json.loads((tmp_path / "results.json").read_text())
    rows = res["rows"]
    assert set(rows) == {"decode_attention, in-memory paged cache", "cold sequential read (yardstick)",
                         "dense, all on disk (cold)", "dense, all in host memory", "dense, all on device"}
    for name in ("dense, all on disk (cold)", "dense, all in host memory", "dense, all on device"):
        assert rows[name]["max_abs_diff"] < 2e-2, (name, rows[name]["max_abs_diff"])  # bf16 parts merged
    assert rows["dense, all on disk (cold)"]["bytes_read_per_step"] == res["kv_bytes"]
    assert 0 <= rows["dense, all on disk (cold)"]["checksum_share_of_read"] < 1
    assert [t["met"] is None for t in res["targets"]] == [False, False, True]
    assert "NOT RUN" in report and str(tmp_path) in report


def test_offload_bench_bad_arguments(capsys):
    with pytest.raises(ArgumentError, match="tokens"):
        run(tokens=10)
    assert main(["bench", "offload", "--world", "2"]) == 2
    assert "--world" in capsys.readouterr().err
    assert main(["bench", "offload", "--sizes", "4096,8192"]) == 2
    assert "one context length" in capsys.readouterr().err
