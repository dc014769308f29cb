"""``longattn bench offload`` on a tiny context: every row runs on real files, outputs match in-memory decode.

Timing figures are not asserted (benchmarks measure, tests do not); what is
checked is exact or a correctness bound: every tier's output against
``decode_attention`` on an in-memory cache, the bytes the disk row read (the
whole KV once per step), the sparse rows' selections equal to
``decode_attention(sparse=...)``'s and their bytes read bounded by the
selected pages, the targets listed.
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
    sparse = {f"{m}, all {where}" for m in ("quest", "double sparsity") for where in ("on disk (cold)", "in host memory")}
    known = {f"{m}, all on disk (cold), next layer's query known" for m in ("quest", "double sparsity")}
    assert set(rows) == {"decode_attention, in-memory paged cache", "cold sequential read (yardstick)",
                         "dense, all on disk (cold)", "dense, all in host memory", "dense, all on device"} | sparse | known
    for name in known:  # the exact next query: every page read ahead is used
        assert rows[name]["prefetch_hits"] == rows[name]["prefetch_pages"], rows[name]
    for name in ("dense, all on disk (cold)", "dense, all in host memory", "dense, all on device"):
        assert rows[name]["max_abs_diff"] < 2e-2, (name, rows[name]["max_abs_diff"])  # bf16 parts merged
    assert rows["dense, all on disk (cold)"]["bytes_read_per_step"] == res["kv_bytes"]
    assert 0 <= rows["dense, all on disk (cold)"]["checksum_share_of_read"] < 1
    for name in sparse:
        assert rows[name]["selections_equal"], name
        assert rows[name]["max_abs_diff"] < 2e-2, (name, rows[name]["max_abs_diff"])
    for m in ("quest", "double sparsity"):
        row = rows[f"{m}, all on disk (cold)"]
        # the first step reads only pages holding selected positions: at most the layer, at least the selection
        # spread over whole pages of all kv heads (amplification >= 1)
        assert 0 < row["bytes_fraction_first_step"] <= 1 and row["io_amplification_first_step"] >= 1
    assert len(res["targets"]) == 8 and all(t["met"] is not None for t in res["targets"])
    assert "NOT RUN" not in report and str(tmp_path) in report


def test_offload_bench_bad_arguments(capsys):
    with pytest.raises(ArgumentError, match="tokens"):
        run(tokens=10)
    assert main(["bench", "offload", "--world", "2"]) == 2
    assert "--world" in capsys.readouterr().err
    assert main(["bench", "offload", "--sizes", "4096,8192"]) == 2
    assert "one context length" in capsys.readouterr().err
