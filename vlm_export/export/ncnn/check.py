"""Child process of ``vlm-export build-ncnn``: a converted ncnn graph against ONNX Runtime CPU.

Reads ``{"bundle", "record", "folder"}`` as JSON on stdin and prints one JSON line:
``{"report": <parity record>}`` or ``{"error": <one line>}``. It runs apart from the build so
that a graph that crashes ncnn (a signal) cannot take the build, or the bundle, with it.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from vlm_export.core.errors import UserError
from vlm_export.core.manifest import read_manifest
from vlm_export.runtime.engines.backends.ncnn_backend import NcnnBackend
from vlm_export.runtime.engines.base import BundleGraph
from vlm_export.runtime.engines.checks import parity as engine_parity


def main() -> int:
    """Compare and print the answer line; 0 unless the request itself is unreadable."""
    request = json.loads(sys.stdin.read())
    bundle = Path(request["bundle"])
    try:
        manifest = read_manifest(bundle)
        graph = BundleGraph(bundle, manifest)
        with contextlib.ExitStack() as stack:
            engine = NcnnBackend(graph, record=request["record"], folder=request["folder"])
            stack.callback(engine.close)
            reference = engine_parity.open_reference(bundle, manifest)
            stack.callback(reference.close)
            report = engine_parity.compare_backends(engine, reference, manifest, "fp32")
    except (UserError, RuntimeError, ValueError) as exc:
        print(json.dumps({"error": " ".join(str(exc).split())}))
        return 0
    print(json.dumps({"report": report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
