"""``benchmarks/gpu_suite.py`` without a GPU: its correctness stage in Triton's interpreter on tiny shapes, and
``kromhc_vision.cli.sections``'s section replacement. (The GPU stages run only on a GPU.)"""
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from kromhc_vision.cli import sections as _report  # noqa: E402
import gpu_suite  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke mode is the suite without a GPU")


def test_correctness_stage_writes_its_results(tmp_path):
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text("# Benchmarks\n\nkept\n")
    assert gpu_suite.main(["--out", str(tmp_path / "out"), "--report", "--benchmarks", str(bench)]) == 0
    result = json.loads((tmp_path / "out" / "correctness.json").read_text())
    rows = result["rows"]
    assert result["passed"] and len(rows) == 4 * 2 * 2  # variants x n in {2, 4} x {fp32, bf16}
    assert {r["status"] for r in rows} == {"ok"} and all(0 <= r["worst_error_ratio"] <= 1 for r in rows)
    text = bench.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n") and "not yet measured" in text
    assert text.count("<!-- gpu_suite:begin -->") == 1 and "16 of 16 cases within tolerance" in text


def test_correctness_case_catches_a_wrong_kernel(monkeypatch):
    """The comparison is not vacuous: a Triton stream_post off by 1 % fails the case, naming X_next."""
    import kromhc_vision.ops.triton as triton_ops
    from kromhc_vision.ops import reference
    monkeypatch.setattr(triton_ops, "stream_post", lambda *a: 1.01 * reference.stream_post(*a))
    worst, bad = gpu_suite._connection_case("kromhc", 4, torch.float32, 5, 24, torch.device("cpu"))
    assert worst > 1 and any(name.startswith("X_next") for name in bad)


def test_ops_stage_records_a_script_that_runs_out_of_time(monkeypatch):
    """A benchmark script past its time limit fails the ops stage with its output so far; the other scripts still
    run and the suite goes on (an uncaught TimeoutExpired lost the stage and every later one)."""
    import subprocess

    def run(cmd, **kwargs):
        if cmd[1].endswith("bench_sinkhorn.py"):
            raise subprocess.TimeoutExpired(cmd, kwargs["timeout"], output=b"n=4 partial\n", stderr=b"")
        return subprocess.CompletedProcess(cmd, 0, stdout="fine\n", stderr="")

    monkeypatch.setattr(gpu_suite.subprocess, "run", run)
    outputs, text, passed = gpu_suite.stage_ops(smoke=False)
    assert not passed and len(outputs) == 4
    assert outputs["bench_sinkhorn.py"]["rc"] == 124 and "n=4 partial" in outputs["bench_sinkhorn.py"]["output"]
    assert [o["rc"] for name, o in outputs.items() if name != "bench_sinkhorn.py"] == [0, 0, 0]


def test_replace_section_keeps_other_text():
    text = "head\n<!-- a:begin -->\nold a\n<!-- a:end -->\nmiddle\n<!-- b:begin -->\nold b\n<!-- b:end -->\ntail\n"
    new = _report.replace_section(text, "a", "new a")
    assert new == text.replace("old a", "new a")
    assert _report.replace_section(new, "b", "new b") == new.replace("old b", "new b")
    appended = _report.replace_section("head\n", "c", "body")
    assert appended == "head\n\n<!-- c:begin -->\nbody\n<!-- c:end -->\n"
    with pytest.raises(ValueError):
        _report.replace_section("<!-- a:end -->\n<!-- a:begin -->\n", "a", "x")
