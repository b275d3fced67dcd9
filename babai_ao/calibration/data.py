"""Token data for calibration and evaluation (WikiText-2, protocol P1).

- Calibration: ``wiki.valid.tokens`` tokenized whole; ``n`` windows of ``seq_len`` tokens at
  start offsets ``torch.randint(0, n_tokens - seq_len, (n,))`` drawn from a generator seeded
  with ``seed`` (the same numbers as ``torch.manual_seed(seed)`` followed by that call, without
  touching the global RNG), i.e. uniform in ``[0, n_tokens - seq_len)``.
- Evaluation: ``wiki.test.raw`` tokenized whole with the tokenizer's default special tokens.

Files are read as bytes and decoded as UTF-8 (a BOM is kept). Line endings: ``wiki.test.raw``
is stored with CRLF endings; the P1 reference numbers (301,948 test tokens, float PPL 20.574)
were taken on text read in Python's text mode, which turns ``\\r\\n`` into ``\\n``. So
``newline="universal"`` (the default) does exactly that translation (``\\r\\n`` and lone
``\\r`` become ``\\n``); ``newline="keep"`` tokenizes the bytes as stored.

The data directory is ``$BABAI_AO_DATA`` when set, else ``../shared/data`` next to the
repository. Token ids are cached under ``babai_ao.calibration.models.cache_dir()/tokens``, keyed by the
file's sha256, the tokenizer (sha256 of its serialized form) and the newline mode.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from babai_ao.errors import BabaiError

from .models import cache_dir

CALIBRATION_FILE = "wikitext-2/wiki.valid.tokens"
TEST_FILE = "wikitext-2-raw/wiki.test.raw"
NEWLINES = ("universal", "keep")


def data_dir() -> Path:
    """``$BABAI_AO_DATA`` or ``<repo>/../shared/data``."""
    env = os.environ.get("BABAI_AO_DATA")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]  # babai_ao/calibration/data.py
    return repo.parent / "shared" / "data"


def _resolve(path: str | os.PathLike[str] | None, default: str) -> Path:
    p = data_dir() / default if path is None else Path(path)
    if not p.is_file():
        raise BabaiError(
            f"data file {p} is missing: put WikiText-2's {Path(default).name} there, set "
            f"BABAI_AO_DATA to the directory holding {default}, or pass path=")
    return p


def read_text(path: str | os.PathLike[str], newline: str = "universal") -> str:
    """UTF-8 text of ``path``; ``newline="universal"`` maps ``\\r\\n``/``\\r`` to ``\\n``."""
    if newline not in NEWLINES:
        raise BabaiError(f"newline={newline!r}: choose one of {NEWLINES}")
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BabaiError(f"{path} is not UTF-8 ({e}): use the WikiText-2 file as distributed"
                         ) from e
    if newline == "universal":
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's serialized form (fast tokenizers) or of its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    else:
        vocab = sorted(tokenizer.get_vocab().items())
        blob = f"{type(tokenizer).__name__}|{vocab}"
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def tokenize_file(tokenizer: Any, path: str | os.PathLike[str], newline: str = "universal"
                  ) -> torch.Tensor:
    """All token ids of a file, 1-D int64, cached on disk."""
    path = Path(path)
    file_hash = hashlib.sha256(path.read_bytes()).hexdigest()
    key = f"{file_hash[:20]}-{tokenizer_fingerprint(tokenizer)[:20]}-{newline}.pt"
    cached = cache_dir() / "tokens" / key
    if cached.is_file():
        try:
            return torch.load(cached, weights_only=True)
        except Exception:  # a torn cache file: tokenize again
            cached.unlink(missing_ok=True)
    ids = tokenizer(read_text(path, newline), return_tensors="pt").input_ids[0].to(torch.int64)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    torch.save(ids, tmp)
    tmp.replace(cached)  # atomic
    return ids


def window_starts(n_tokens: int, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n`` start offsets uniform in ``[0, n_tokens - seq_len)`` (P1's draw)."""
    if n <= 0 or seq_len <= 0:
        raise BabaiError(f"n={n} and seq_len={seq_len} must be positive")
    if n_tokens - seq_len <= 0:
        raise BabaiError(f"the text has {n_tokens} tokens, fewer than seq_len + 1 = "
                         f"{seq_len + 1}: use a shorter seq_len or a longer file")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seq_len, (n,), generator=gen)


def calibration_windows(tokenizer: Any, path: str | os.PathLike[str] | None = None, n: int = 128,
                        seq_len: int = 512, seed: int = 0, newline: str = "universal"
                        ) -> torch.Tensor:
    """P1 calibration batch: int64 ``[n, seq_len]`` windows of ``wiki.valid.tokens``."""
    ids = tokenize_file(tokenizer, _resolve(path, CALIBRATION_FILE), newline)
    starts = window_starts(ids.numel(), n, seq_len, seed)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def test_tokens(tokenizer: Any, path: str | os.PathLike[str] | None = None,
                newline: str = "universal") -> torch.Tensor:
    """P1 evaluation text: every token id of ``wiki.test.raw``, 1-D int64."""
    return tokenize_file(tokenizer, _resolve(path, TEST_FILE), newline)


test_tokens.__test__ = False  # not a pytest test despite the name
