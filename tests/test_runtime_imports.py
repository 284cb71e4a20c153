"""The device runtime never imports torch, open_clip or onnx, and imports OpenCV only lazily.

A subprocess installs an import hook that makes those packages unimportable, imports every module
of ``vlm_export.runtime``, and runs ``vlm-edge info`` and ``vlm-edge run`` on a real bundle.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from fakebundle import make_bundle, write_images

CHILD = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys

    BLOCKED = ("torch", "torchvision", "open_clip", "onnx", "onnxscript")
    OPTIONAL = ("tensorrt", "cuda")  # extras a backend may import at module level
    # the [serve] extra's packages: a [cpu]-only device has none of them (serve says so in one
    # line); the modules of serve/ are then skipped, never counted as torch leaks
    OPTIONAL += ("fastapi", "starlette", "anyio", "uvicorn", "prometheus_client", "paho",
                 "multipart", "threadpoolctl")

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked in the device runtime: {name}")
            return None

    sys.meta_path.insert(0, Block())
    import vlm_export.runtime as runtime

    failures, skipped = [], []
    import vlm_export.core as core
    modules = [*pkgutil.walk_packages(runtime.__path__, runtime.__name__ + "."),
               *pkgutil.walk_packages(core.__path__, core.__name__ + ".")]
    for info in modules:
        if info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] in OPTIONAL:
                skipped.append(info.name)
            else:
                failures.append(f"{info.name}: {exc}")
        except Exception as exc:
            failures.append(f"{info.name}: {type(exc).__name__}: {exc}")

    from vlm_export.runtime.cli import main
    codes = [main(["info", sys.argv[1]]), main(["run", sys.argv[1], sys.argv[2], "--quiet"])]
    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED + ("cv2",)))
    print(json.dumps({"failures": failures, "skipped": skipped, "codes": codes, "loaded": loaded}))
    """
)


def test_runtime_imports_without_torch(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    write_images(tmp_path / "images", 3)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(bundle), str(tmp_path / "images")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["failures"] == []
    assert report["codes"] == [0, 0]
    assert report["loaded"] == []
