"""The product: the ``babai-ao`` command, its demo, the run records it writes and their plots.

``main`` (``app``) parses, checks every argument before any work (``preflight``) and
dispatches; each command has its module (``quantize``, ``evaluate``, ``export``,
``report``, ``demo``; ``stream`` is ``quantize --stream``/``--save-state``), sharing ``sources`` (the
MODEL argument), ``depth`` (the blocks a run kept of the model's: "first 2 of 30 blocks") and
``output`` (messages, directories written atomically); ``launch`` starts ``quantize
--nproc N`` as ``N`` processes under torchrun. ``runs`` reads and writes
``babai_run.json`` records, ``plots`` draws them. Every step is a library call
from the layers below (``calibration``, ``checkpoints``, ``ao``, ``babai_ao.export``); nothing
here is imported by them.
"""

from __future__ import annotations

from .app import main

__all__ = ["main"]
