import subprocess
import sys

import pytest

import kromhc_vision as kv
from kromhc_vision.__main__ import parameter_table


def test_parameter_table_rows_come_from_the_counts():
    table = parameter_table(768, [4, 8])
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert set(rows) == set(kv.CONNECTIONS)
    assert f"{kv.connection_num_params('kromhc', 8, 768):,}" in rows["kromhc"]
    assert f"{kv.connection_num_params('mhclite', 4, 768):,}" in rows["mhclite"]
    assert "refused (8! = 40,320 logits)" in rows["mhclite"]


def test_table_command_runs():
    out = subprocess.run([sys.executable, "-m", "kromhc_vision", "table", "--dim", "64", "--streams", "2", "4"],
                         capture_output=True, text=True, check=True).stdout
    assert "params, n=4" in out and f"{kv.connection_num_params('hc', 2, 64):,}" in out


def test_table_command_refuses_a_bad_width_or_stream_count():
    for args, value in ((["--dim", "-5"], "-5"), (["--dim", "0"], "0"), (["--streams", "4", "0"], "0")):
        run = subprocess.run([sys.executable, "-m", "kromhc_vision", "table", *args], capture_output=True, text=True)
        assert run.returncode == 2 and f"got {value}" in run.stderr and "refused" not in run.stdout, run


def test_refused_cells_name_the_factor_over_the_limit_and_other_errors_are_raised(monkeypatch):
    """KromHC at n = 14 = 2 x 7 is refused for its factor 7 (7! logits), not 14!; an unknown $KROMHC_BACKEND was
    tabled as "refused (4! = 24 logits)" in every row, HC's included."""
    rows = {line.split("|")[1].strip(): line for line in parameter_table(8, [14]).splitlines()[2:]}
    assert "refused (7! = 5,040 logits)" in rows["kromhc"] and "refused (14! = " in rows["mhclite"]
    monkeypatch.setenv("KROMHC_BACKEND", "cuda")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        parameter_table(768, [4])
