"""One exception type, so callers can catch every input problem babai-ao reports."""

from __future__ import annotations


class BabaiError(ValueError):
    """Bad input to babai-ao. The message names the problem and the fix."""
