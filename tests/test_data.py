"""Calibration windows and evaluation tokens (protocol P1)."""

from __future__ import annotations

import pytest
import torch

from babai_ao import BabaiError
from babai_ao.calibration.data import (
    calibration_windows,
    data_dir,
    read_text,
    test_tokens,
    tokenize_file,
    window_starts,
)


class CharTokenizer:
    """Minimal stand-in: one id per character (``ord``), no special tokens."""

    def __call__(self, text: str, return_tensors: str = "pt"):
        class Out:
            input_ids = torch.tensor([[ord(c) for c in text]])
        return Out()

    def get_vocab(self) -> dict[str, int]:
        return {"<char>": 0}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BABAI_AO_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_window_starts_match_manual_seed_draw():
    torch.manual_seed(0)
    expected = torch.randint(0, 1000 - 50, (16,))
    state = torch.get_rng_state()
    starts = window_starts(1000, 16, 50, seed=0)
    assert torch.equal(starts, expected)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert not torch.equal(window_starts(1000, 16, 50, seed=1), starts)


def test_windows_are_slices_of_the_file(cache):
    text = "".join(chr(65 + i % 26) for i in range(3000))
    f = cache / "valid.txt"
    f.write_bytes(text.encode())
    w = calibration_windows(CharTokenizer(), f, n=7, seq_len=100, seed=3)
    assert w.shape == (7, 100) and w.dtype == torch.int64
    starts = window_starts(3000, 7, 100, seed=3)
    for row, s in zip(w, starts.tolist()):
        assert "".join(map(chr, row.tolist())) == text[s : s + 100]
    assert torch.equal(w, calibration_windows(CharTokenizer(), f, n=7, seq_len=100, seed=3))
    assert not torch.equal(w, calibration_windows(CharTokenizer(), f, n=7, seq_len=100, seed=4))


def test_newlines_and_bom(cache):
    f = cache / "crlf.txt"
    f.write_bytes("\ufeffa\r\nb\rc\n".encode())
    assert read_text(f) == "\ufeffa\nb\nc\n"
    assert read_text(f, newline="keep") == "\ufeffa\r\nb\rc\n"
    assert tokenize_file(CharTokenizer(), f, "keep").numel() == 8
    assert tokenize_file(CharTokenizer(), f).numel() == 7
    with pytest.raises(BabaiError, match="newline"):
        read_text(f, newline="crlf")


def test_token_cache_keyed_by_content(cache):
    f = cache / "t.txt"
    f.write_bytes(b"abc")
    assert tokenize_file(CharTokenizer(), f).tolist() == [97, 98, 99]
    f.write_bytes(b"xy")  # new content, new key: never a stale cache hit
    assert tokenize_file(CharTokenizer(), f).tolist() == [120, 121]
    assert len(list((cache / "cache" / "tokens").glob("*.pt"))) == 2


def test_missing_file_names_path(cache, monkeypatch):
    monkeypatch.setenv("BABAI_AO_DATA", str(cache / "nowhere"))
    with pytest.raises(BabaiError, match="nowhere/wikitext-2/wiki.valid.tokens"):
        calibration_windows(CharTokenizer())
    with pytest.raises(BabaiError, match="wiki.test.raw"):
        test_tokens(CharTokenizer())
    with pytest.raises(BabaiError, match="missing.txt"):
        calibration_windows(CharTokenizer(), cache / "missing.txt")


def test_bad_window_arguments(cache):
    f = cache / "short.txt"
    f.write_bytes(b"abcdef")
    with pytest.raises(BabaiError, match="seq_len"):
        calibration_windows(CharTokenizer(), f, n=2, seq_len=6)
    with pytest.raises(BabaiError, match="positive"):
        calibration_windows(CharTokenizer(), f, n=0, seq_len=2)


@pytest.mark.model
def test_p1_token_counts(smollm2_small):
    """The P1 reference counts (shared/data/README.md): text-mode newlines, whole files."""
    if not (data_dir() / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.fail(f"P1 data missing under {data_dir()}")
    tok = smollm2_small[1]
    assert test_tokens(tok).numel() == 301_948
    w = calibration_windows(tok)
    assert w.shape == (128, 512)
