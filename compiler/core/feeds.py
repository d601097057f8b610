"""Model inputs made without data: random token ids at a given shape (benchmarks, input-flow checks)."""

from __future__ import annotations

from typing import Dict, List

import numpy as np


def synthetic_feed(input_names: List[str], batch: int, seq: int, vocab: int = 30522, seed: int = 0,
                   ) -> Dict[str, np.ndarray]:
    """Random token ids at a given shape (benchmarks, input-flow checks): every position is valid."""
    rng = np.random.default_rng(seed)
    feed = {}
    for name in input_names:
        if name == "input_ids":
            # ids 1000..30000 as before for a BERT-size vocabulary; a small one draws below its size
            ids = rng.integers(1000 if vocab > 2000 else 1, min(vocab, 30000), size=(batch, seq), dtype=np.int64)
            ids[:, 0], ids[:, -1] = 101 % vocab, 102 % vocab
            feed[name] = ids
        elif name == "attention_mask":
            feed[name] = np.ones((batch, seq), dtype=np.int64)
        else:
            feed[name] = np.zeros((batch, seq), dtype=np.int64)
    return feed
