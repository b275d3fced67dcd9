"""``python -m babai_ao`` is the ``babai-ao`` command (and what ``torchrun -m babai_ao`` runs)."""

import sys

from babai_ao.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
