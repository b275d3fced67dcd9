"""``--nproc N``: the same command started again as ``N`` processes under ``torchrun``.

``python -m torch.distributed.run --standalone --nproc-per-node N -m babai_ao ARGS`` with the
very arguments given (each process sees ``WORLD_SIZE = N`` and joins the group instead of
launching again). torchrun stops the other processes as soon as one fails and exits non-zero.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The command line that runs ``babai-ao ARGV`` as ``nproc`` processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "babai_ao", *argv]


def torchrun(nproc: int, argv: Sequence[str]) -> int:
    """Run ``babai-ao ARGV`` as ``nproc`` processes; their exit status (0: all succeeded)."""
    return subprocess.run(torchrun_command(nproc, argv), check=False).returncode
