"""Every shipped recipe builds with export.exporter=dynamo (the exporter torch makes the default; the
TorchScript one is deprecated since torch 2.9): CLI sweeps on tiny_bert per target, plus the ModernBERT fp16
build that broke on the dynamo graph. The graphs' equivalence to the torch fake-quant models is checked per
step in tests/stages/test_export_dynamo.py; here each build passes its check stage and gate."""

from __future__ import annotations

import json

import pytest

from tests.conftest import FAST

TINY = FAST + ["recipe.gate.min_top1_agreement=0.5", "bench.enabled=false", "export.exporter=dynamo"]

pytestmark = pytest.mark.slow  # 14 dynamo builds in four multiruns (~2 min quiet); per-step dynamo graphs: test_export_dynamo

# every shipped recipe on the ONNX targets it runs on (fp8 on ort needs export.opset >= 19: its own build)
SWEEPS = {
    "ort": ("tiny_bert", "fp32,fp16,int8_dynamic,int8_static,int8,int8_smoothquant,int8_weight_only", []),
    "ort-fp8": ("tiny_bert", "fp8", ["export.opset=19"]),
    "trt": ("tiny_bert", "nvfp4,nvfp4_rotate,fp8,int8_static", []),
    "ort-modernbert": ("tiny_modernbert", "fp16,int8", []),
}


@pytest.mark.parametrize("sweep", list(SWEEPS))
def test_every_recipe_builds_with_the_dynamo_exporter(qcompile, sweep):
    model, recipes, extra = SWEEPS[sweep]
    target = sweep.split("-")[0]
    r = qcompile("-m", f"model={model}", f"recipe={recipes}", f"target={target}", *TINY, *extra, timeout=3000)
    assert r.rc == 0, r
    runs = r.run_dirs()
    assert sorted(d.name.split("_", 1)[1] for d in runs) == sorted(
        f"{model}_{name}_{target}" for name in recipes.split(","))
    for run in runs:
        report = json.loads((run / "report.json").read_text())
        assert report["status"] == "passed", (run.name, report.get("gate"))
        assert report["onnx"]["exporter"] == "dynamo", run.name
