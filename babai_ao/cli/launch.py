"""``--nproc N``: the same command started again as ``N`` processes under ``torchrun``.

``python -m torch.distributed.run --standalone --nproc-per-node N -m babai_ao ARGS`` with the
arguments given, less ``--nproc`` (each process sees ``WORLD_SIZE = N`` and joins the group). torchrun stops the other processes as soon as one fails and exits non-zero.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence


def without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` less ``--nproc N`` / ``--nproc=N``: the processes need not see it (they join
    the group torchrun describes), and torchrun's own parser would take ``--nproc`` for an
    abbreviation of its ``--nproc-per-node``."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The command line that runs ``babai-ao ARGV`` as ``nproc`` processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "babai_ao", *without_nproc(argv)]


def torchrun(nproc: int, argv: Sequence[str]) -> int:
    """Run ``babai-ao ARGV`` as ``nproc`` processes; their exit status (0: all succeeded)."""
    return subprocess.run(torchrun_command(nproc, argv), check=False).returncode
