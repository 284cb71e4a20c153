"""The ``vlm-export`` console script, kept tiny: a Ctrl-C while the command's modules are still
being imported is caught here (one line, exit 130), not shown as a traceback."""

from __future__ import annotations

import sys


def entry() -> None:
    """Import and run ``vlm-export``; exit with its status."""
    try:
        from vlm_export.export.cli import main
    except KeyboardInterrupt:
        print("vlm-export: interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())
