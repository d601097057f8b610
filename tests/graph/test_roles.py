"""The role finder reads each Linear's role from the dataflow of one forward, on four families that name
their layers differently (BERT, DistilBERT, RoBERTa, ModernBERT), embedding models and classifiers."""

from __future__ import annotations

import pytest
from conftest import model_cfg

# what each family calls its layers (the finder never sees this table: it is the test's answer key)
EXPECTED = {
    "tiny_bert": {"attention_qkv": ["attention.self.query", "attention.self.key", "attention.self.value"],
                  "attention_output": ["attention.output.dense"], "ffn_up": ["intermediate.dense"],
                  "ffn_down": ["layer.{i}.output.dense"]},
    "tiny_roberta": {"attention_qkv": ["attention.self.query", "attention.self.key", "attention.self.value"],
                     "attention_output": ["attention.output.dense"], "ffn_up": ["intermediate.dense"],
                     "ffn_down": ["layer.{i}.output.dense"]},
    "tiny_distilbert": {"attention_qkv": ["attention.q_lin", "attention.k_lin", "attention.v_lin"],
                        "attention_output": ["attention.out_lin"], "ffn_up": ["ffn.lin1"], "ffn_down": ["ffn.lin2"]},
    "tiny_modernbert": {"attention_qkv": ["attn.Wqkv"], "attention_output": ["attn.Wo"], "ffn_up": ["mlp.Wi"],
                        "ffn_down": ["mlp.Wo"]},
}
HEADS = {"tiny_bert": {"pooler.dense"}, "tiny_roberta": {"pooler.dense"}, "tiny_distilbert": set(),
         "tiny_modernbert": set()}
CLASSIFIER_HEADS = {"tiny_bert": {"bert.pooler.dense", "classifier"},
                    "tiny_roberta": {"classifier.dense", "classifier.out_proj"},
                    "tiny_distilbert": {"pre_classifier", "classifier"},
                    "tiny_modernbert": {"head.dense", "classifier"}}


@pytest.fixture(scope="module")
def loaded():
    from compiler.stages.models import load_model

    return {name: load_model(model_cfg(name)) for name in EXPECTED}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_roles_of_every_block_linear(loaded, name):
    roles = loaded[name].roles
    assert set(roles.role.values()) <= {"attention_qkv", "attention_output", "ffn_up", "ffn_down", "head"}
    for role, suffixes in EXPECTED[name].items():
        got = roles.names(role)
        want = []
        for i in range(2):  # two blocks
            want += [n for n in roles.role for s in suffixes
                     if n.endswith(s.format(i=i)) and f".{i}." in n and n not in want]
        assert got == want and got, (role, got)
    heads = {n.removeprefix("inner.") for n in roles.names("head")}
    assert heads == HEADS[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_roles_of_classifier_heads(name):
    """Classifier heads (pooler + dense, pre_classifier + ReLU + classifier, tanh heads) are heads, not FFNs."""
    from compiler.stages.models import load_model

    m = load_model(model_cfg(name, task="classification"))
    assert {n.removeprefix("inner.") for n in m.roles.names("head")} == CLASSIFIER_HEADS[name]
    assert len(m.roles.names("ffn_down")) == 2 and len(m.roles.names("attention_output")) == 2


def test_selectors_pick_by_role_and_block(loaded):
    from compiler.graph.roles import bad_selector, expand_patterns

    roles = loaded["tiny_distilbert"].roles
    downs = roles.names("ffn_down")
    assert roles.select(["ffn_down[0]"]) == [downs[0]]
    assert roles.select(["ffn_down[-1]"]) == [downs[-1]]
    assert roles.select(["ffn_down[5]"]) == []
    assert roles.select(["attention_output", "ffn_down"]) == roles.names("attention_output") + downs
    # role selectors expand to exact names; other strings stay fnmatch patterns
    assert expand_patterns(["*embeddings*", "ffn_down[0]"], roles) == ["*embeddings*", downs[0]]
    assert bad_selector("ffn_dwn") == "did you mean 'ffn_down'?"
    assert bad_selector("*pooler*") is None


def test_gated_ffn_and_sdpa():
    """A gated FFN (act(x) * gate, as in Llama-style MLPs) and attention through SDPA are found by dataflow too."""
    import torch

    from compiler.graph.roles import find_roles

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = (torch.nn.Linear(8, 8) for _ in range(4))
            self.gate, self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
            self.norm = torch.nn.LayerNorm(8)

        def forward(self, x):
            q, k, v = self.a(x), self.b(x), self.c(x)
            x = self.norm(x + self.d(torch.nn.functional.scaled_dot_product_attention(q, k, v)))
            return x + self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))

    roles = find_roles(Block(), [torch.randn(1, 4, 8)])
    assert roles.role == {"a": "attention_qkv", "b": "attention_qkv", "c": "attention_qkv", "d": "attention_output",
                          "gate": "ffn_up", "up": "ffn_up", "down": "ffn_down"}


def test_a_model_with_a_small_vocabulary_gets_token_ids_it_has():
    """A model whose vocabulary is smaller than BERT's (an ELECTRA saved with 1,000 tokens) failed at load with
    IndexError: the roles trace, the export and the bench fed ids 1000-30000. Every synthetic feed now draws
    below the model's embedding rows; a BERT-size vocabulary keeps the ids it had (so builds keep their bytes)."""
    import numpy as np
    import torch
    from transformers import BertConfig, BertModel

    from compiler.core.feeds import synthetic_feed
    from compiler.graph.roles import example_inputs, find_roles, vocab_rows

    torch.manual_seed(0)
    small = BertModel(BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64)).eval()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    assert vocab_rows(small) == 500
    assert int(example_inputs(names, vocab=500)[0].max()) < 500
    assert int(synthetic_feed(names, 4, 64, vocab=500, seed=1)["input_ids"].max()) < 500
    roles = find_roles(small, example_inputs(names, vocab=vocab_rows(small)))
    assert roles.names("ffn_up") and roles.names("attention_qkv")
    # a BERT-size vocabulary: the same ids as before the change
    ids = synthetic_feed(["input_ids"], 2, 8, seed=1)["input_ids"]
    assert ids[0, 0] == 101 and ids[0, -1] == 102 and ids[:, 1:-1].min() >= 1000
    assert [int(t) for t in example_inputs(names)[0][0]] == [101, 2000, 2001, 2002, 2003, 2004, 2005, 102]
    assert np.all(synthetic_feed(["input_ids"], 2, 8, vocab=30522, seed=1)["input_ids"] == ids)
