"""bench/profile_engines.py on two real graphs (never its timings): one row per op type of either engine, an op
only one engine runs shows '-' in the other's column, the totals add up the rows."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import profile_engines  # noqa: E402  (bench/ is a folder of scripts, not a package)

from compiler.steps.base import StepContext  # noqa: E402
from compiler.steps.int8_static import Int8StaticStep, Params  # noqa: E402
from targets.base import get_target  # noqa: E402


def test_fp32_and_int8_graphs_side_by_side(exported, tmp_path, capsys):
    model, data, fp32 = exported["tiny_bert"]
    ctx = StepContext(target=get_target("ort").capabilities, model_info=model.info, calibration=data.calibration, work_dir=tmp_path)
    int8 = Int8StaticStep(Params()).apply_onnx(fp32, tmp_path / "q.onnx", ctx)
    assert profile_engines.main([f"fp32={fp32}", f"int8={int8}", "--runs", "4", "--cold", "1", "--seq", "16"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| op type | fp32 ms (nodes) | int8 ms (nodes) |"
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    rows = {c[0].strip("`"): c[1:] for c in cells[2:-1]}
    assert rows["MatMulIntegerToFloat"][0] == "-" and rows["MatMulIntegerToFloat"][1].endswith("(12)")
    assert rows["MatMul"][0] != "-"
    assert cells[-1][0] == "total"
    totals = [float(x) for x in cells[-1][1:]]
    for col, total in enumerate(totals):  # each column's rows add up to its total (2-decimal rounding)
        summed = sum(float(r[col].split()[0]) for r in rows.values() if r[col] != "-")
        assert abs(summed - total) <= 0.01 * len(rows), (summed, total)
