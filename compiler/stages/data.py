"""Calibration and evaluation data: sentences read from text files, tokenized into fixed-length feeds."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List

import numpy as np

from compiler.core.paths import BUILTIN_DATA_DIR
from compiler.core.errors import BuildError, RecipeError

log = logging.getLogger(__name__)

BUILTIN_DIR = BUILTIN_DATA_DIR


@dataclass
class Features:
    """Tokenized sentences: name -> int64 array [N, seq_len], in the model's input order."""

    texts: List[str]
    arrays: Dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.texts)

    def batches(self, batch_size: int) -> Iterator[Dict[str, np.ndarray]]:
        for start in range(0, len(self), batch_size):
            yield {k: v[start:start + batch_size] for k, v in self.arrays.items()}

    def sha256(self) -> str:
        h = hashlib.sha256()
        for k in sorted(self.arrays):
            h.update(k.encode())
            h.update(np.ascontiguousarray(self.arrays[k]).tobytes())
        return h.hexdigest()


@dataclass
class Dataset:
    calibration: Features
    evaluation: Features
    files: Dict[str, str]  # role -> path
    files_sha256: Dict[str, str]


def read_sentences(path: Path, key: str) -> List[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise RecipeError(key, f"cannot read {path}: {e.strerror}", "give an existing UTF-8 text file, one sentence per line") from e
    except UnicodeDecodeError as e:
        raise RecipeError(key, f"{path} is not UTF-8 text", "save it as UTF-8, one sentence per line") from e
    return [ln.strip() for ln in lines if ln.strip()]


def _take(sentences: List[str], n: int, key: str, role: str, path: Path, policy: str) -> List[str]:
    if not sentences:
        raise BuildError(f"data.{role}_file: {path} holds no sentences; {role} needs at least one")
    if n > len(sentences):
        if policy == "error":
            raise RecipeError(key, f"{n} samples asked but {path.name} has {len(sentences)}",
                              f"set {key}<={len(sentences)} or data.on_short_data=clamp")
        log.warning("%s=%d but %s has only %d sentences: using all %d", key, n, path.name, len(sentences),
                    len(sentences))
        return sentences
    return sentences[:n]


def check_data_files(cfg, need_calibration: bool = True) -> None:
    """Validate-time look at the data files (text only, no tokenizer): an empty file, or fewer
    sentences than asked with data.on_short_data=error, is a recipe error before any model loads."""
    for role in ("calibration", "evaluation"):
        path = data_file(cfg, role)
        key = f"data.{role}_file"
        sentences = read_sentences(path, key)
        if not sentences:
            raise RecipeError(key, f"{path} holds no sentences",
                              "give a UTF-8 text file with one sentence per line")
        if role == "calibration" and not need_calibration:
            continue
        n = int(getattr(cfg, f"{role}_samples"))
        if n > len(sentences) and cfg.on_short_data == "error":
            raise RecipeError(f"data.{role}_samples", f"{n} samples asked but {path.name} has {len(sentences)}",
                              f"set data.{role}_samples<={len(sentences)} or data.on_short_data=clamp")


def tokenize(tokenizer, texts: List[str], seq_len: int, input_names: List[str]) -> Features:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    arrays = {}
    for name in input_names:
        if name in enc:
            arrays[name] = enc[name].astype(np.int64)
        elif name == "token_type_ids":
            arrays[name] = np.zeros_like(enc["input_ids"], dtype=np.int64)
        else:
            raise BuildError(f"tokenizer gives no {name!r} (has {sorted(enc.keys())})")
    return Features(texts=list(texts), arrays=arrays)


def data_file(cfg, role: str) -> Path:
    given = getattr(cfg, f"{role}_file")
    return Path(given).expanduser() if given else BUILTIN_DIR / f"{role}.txt"


def load_data(cfg, tokenizer, input_names: List[str], need_calibration: bool = True) -> Dataset:
    """Load stage for data. cfg is the `data` section."""
    files, hashes, feats = {}, {}, {}
    for role in ("calibration", "evaluation"):
        path = data_file(cfg, role)
        files[role] = str(path)
        sentences = read_sentences(path, f"data.{role}_file")
        hashes[role] = hashlib.sha256("\n".join(sentences).encode()).hexdigest()
        n = int(getattr(cfg, f"{role}_samples"))
        if role == "calibration" and not need_calibration:
            n = min(n, len(sentences)) or 1
        chosen = _take(sentences, n, f"data.{role}_samples", role, path, cfg.on_short_data)
        feats[role] = tokenize(tokenizer, chosen, int(cfg.seq_len), input_names)
    return Dataset(calibration=feats["calibration"], evaluation=feats["evaluation"], files=files,
                   files_sha256=hashes)


