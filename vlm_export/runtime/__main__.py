"""``python -m vlm_export.runtime`` runs the ``vlm-edge`` command."""

import sys

from vlm_export.runtime.cli import main

sys.exit(main())
