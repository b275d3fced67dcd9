"""What the command prints and writes: progress lines, and output directories that appear whole.

An output directory is built in a temporary sibling and renamed into place only when the
command completes, so Ctrl-C or an error never leaves a half-written directory that looks
complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from babai_ao.errors import BabaiError


def say(msg: str) -> None:
    print(msg, flush=True)


@contextlib.contextmanager
def atomic_directory(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of ``out`` that becomes ``out`` only if the block completes."""
    if out.exists() and not overwrite:
        raise BabaiError(f"{out} already exists: choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
