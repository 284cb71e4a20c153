"""Hostile input corpus: bundles, manifests, companion files, state files, images, folders and
command-line values, each run through ``vlm-edge`` (info, run) or ``vlm-export``.

Every case must end with one clear line (exit status 1 or 2, or an error record for one frame),
never a traceback, and must leave the bundle and state files exactly as they were. The cases run
in-process through the command-line entry points: an exception escaping ``main`` is what the user
would see as a traceback, and is counted as one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fakebundle import make_bundle, write_images
from PIL import Image

from vlm_export.core import manifest as mf
from vlm_export.core.json_input import nesting_depth
from vlm_export.core.manifest_schema import manifest_schema
from vlm_export.runtime import cli

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers
def _snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every regular file under ``roots`` (links, FIFOs and loops left alone)."""
    digest = {}
    for root in roots:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            if not path.is_symlink():
                digest[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def _edge(argv: list[str], capsys) -> tuple[int, list[str], str]:
    """Run vlm-edge in-process: (exit status, stderr lines, stdout); a traceback fails the test."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code if isinstance(exc.code, int) else 2
    except BaseException as exc:  # pragma: no cover - the failure this corpus looks for
        pytest.fail(f"traceback: {type(exc).__name__}: {exc}")
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    return code, lines, captured.out


def _error_line(lines: list[str]) -> str:
    errors = [line for line in lines if ": error:" in line]
    assert len(errors) == 1, lines
    return errors[0]


def _rehash(bundle: Path, name: str) -> None:
    """Record a replaced file's sha256 and size, as someone re-hashing a tampered bundle would."""
    path = bundle / mf.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["files"][name] = mf.file_record(bundle / name)
    path.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bad") / "bundle")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    write_images(folder, 2)
    return folder


@pytest.fixture
def bundle(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "bundle"))


# ----------------------------------------------------------------------------- the schema
def test_schema_is_valid_and_documents_every_field() -> None:
    import jsonschema

    schema = manifest_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is True  # later sections may be added

    def walk(node: dict, where: str) -> None:
        for name, sub in node.get("properties", {}).items():
            assert "description" in sub, f"{where}.{name} has no description"
            walk(sub, f"{where}.{name}")
        for name, sub in node.get("$defs", {}).items():
            assert "description" in sub, f"$defs.{name} has no description"
            walk(sub, f"$defs.{name}")

    walk(schema, "manifest")
    assert set(schema["required"]) <= set(schema["properties"])


def test_a_valid_bundle_passes_the_schema(pristine: Path) -> None:
    mf.validate_manifest(json.loads((pristine / mf.MANIFEST_NAME).read_text()))


def test_nesting_depth_is_measured_outside_strings() -> None:
    assert nesting_depth('{"a": [1, {"b": "[[[[{{{{"}]}') == 3
    assert nesting_depth('["\\"[[[", []]') == 2
    assert nesting_depth("[" * 100_000 + "]" * 100_000) == 100_000


# ----------------------------------------------------------------------------- manifests
def _set(path: tuple, value: object) -> Callable[[dict], None]:
    def edit(manifest: dict) -> None:
        *parents, last = path
        node = manifest
        for key in parents:
            node = node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return edit


_DELETE = object()

MANIFEST_CASES = [
    (("text", "embeddings"), 5, "text.embeddings: expected a file name (string), got 5"),
    (("text", "embeddings"), None, "text.embeddings: expected a file name (string), got null"),
    (("text", "embeddings"), ["a.npy"], "text.embeddings: expected a file name (string), got a"),
    (("labels", "file"), {"x": 1}, "labels.file: expected a file name (string), got an object"),
    (("engine", "onnx"), "../x.onnx", "engine.onnx: expected a plain file name"),
    (("preprocess", "fill_color"), "black", "fill_color: expected an integer, got the string"),
    (("preprocess", "mean"), "red", "preprocess.mean: expected a list, got the string 'red'"),
    (("preprocess", "std"), [0, 1, 1], "preprocess.std[0]: expected a number > 0, got 0"),
    (("preprocess", "size"), [32], "preprocess.size: expected a list of exactly 2 items, got 1"),
    (("preprocess", "resize_mode"), "zoom", "resize_mode: expected one of 'shortest'"),
    (("preprocess", "size"), [10**5, 10**5], "expected a number <= 16384, got 100000"),
    (("model",), "ViT-B-16", "model: expected an object, got the string 'ViT-B-16'"),
    (("model", "untrained"), "no", "model.untrained: expected true or false"),
    (("engine",), "x", "engine: expected an object"),
    (("engine", "inputs", 0, "shape", 3), 32.5, "engine.inputs[0].shape[3]: expected an integer"),
    (("engine", "batch_size"), 10**30, None),  # huge but an integer: refused by the contract
    (("engines",), {}, "engines: expected a list, got an object"),
    (("files",), [], "files: expected an object, got a list"),
    (("files", mf.CLASSES_FILE, "sha256"), "abc", "sha256: expected lower-case hex sha256"),
    (("adaptation", "tca"), "imagenet", "adaptation.tca: expected an object"),
    (("adaptation", "tca", "capacity"), "3", "adaptation.tca.capacity: expected an integer"),
    (("adaptation", "tca", "capacity"), 0, "adaptation.tca.capacity: expected a number >= 1"),
    (("adaptation", "rail", "fusion_beta"), 2, "fusion_beta: expected a number <= 1, got 2"),
    (("condensation",), "x", "condensation: expected an object or null"),
    (("condensation",), None, "method tca needs a condensation section"),
    (("method",), "magic", "method: expected one of 'zeroshot'"),
    (("labels", "num_classes"), -1, "labels.num_classes: expected a number >= 1, got -1"),
    (("text",), _DELETE, "(top level): missing field 'text'"),
    (("schema_version",), "1", "schema_version: expected an integer"),
    (("format",), "zip", "not a vlm-export bundle"),
]


@pytest.mark.parametrize(("path", "value", "message"), MANIFEST_CASES)
def test_manifest_with_wrong_types_is_one_line(bundle, capsys, path, value, message) -> None:
    manifest_path = bundle / mf.MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    _set(path, value)(manifest)
    manifest_path.write_text(json.dumps(manifest))
    before = _snapshot(bundle)
    code, lines, _ = _edge(["info", str(bundle)], capsys)
    assert code == 1
    line = _error_line(lines)
    if message:
        assert message in line
    assert _snapshot(bundle) == before


RAW_MANIFESTS = [
    ("deep", lambda: "[" * 100_000 + "]" * 100_000, "nested 100000 levels deep"),
    ("deep object", lambda: '{"a":' * 50_000 + "1" + "}" * 50_000, "levels deep"),
    ("NaN", None, "NaN is not a JSON number"),
    ("empty", lambda: "", "is not valid JSON"),
    ("not UTF-8", lambda: b'{"format": "\xff\xfe"}', "is not UTF-8 text"),
    ("huge", lambda: " " * (mf.MAX_MANIFEST_BYTES + 1), "larger than"),
    ("a list", lambda: "[1, 2]", "expected a JSON object, got a list"),
    ("a string", lambda: '"bundle"', "expected a JSON object, got the string"),
]


@pytest.mark.parametrize(
    ("name", "content", "message"), RAW_MANIFESTS, ids=[c[0] for c in RAW_MANIFESTS]
)
def test_unparseable_manifest_is_one_line(bundle, capsys, name, content, message) -> None:
    path = bundle / mf.MANIFEST_NAME
    if content is None:  # a NaN where a number goes (Python's parser would accept it)
        text = path.read_text().replace('"cosine_min": 1.0', '"cosine_min": NaN')
        assert "NaN" in text
    else:
        text = content()
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    before = _snapshot(bundle)
    code, lines, _ = _edge(["info", str(bundle)], capsys)
    assert code == 1 and message in _error_line(lines)
    assert _snapshot(bundle) == before


def test_manifest_that_is_a_fifo_is_never_opened(bundle, capsys) -> None:
    path = bundle / mf.MANIFEST_NAME
    path.unlink()
    os.mkfifo(path)
    code, lines, _ = _edge(["info", str(bundle)], capsys)
    assert code == 1 and "manifest.json" in _error_line(lines)


# ----------------------------------------------------------------------------- companion files
def _npz_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros((6, 8), np.float32))
    return buffer.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _text(values: float) -> bytes:
    array = np.ones((6, 8), np.float32) / np.sqrt(8)
    array[2, 3] = values
    return _npy_bytes(array)


COMPANION_CASES = [
    ("npz under npy", mf.TEXT_EMBEDDINGS, _npz_bytes, ".npz archive saved under a .npy name"),
    ("NaN rows", mf.TEXT_EMBEDDINGS, lambda: _text(np.nan), "holds NaN values"),
    ("inf rows", mf.TEXT_EMBEDDINGS, lambda: _text(np.inf), "holds infinite values"),
    ("int dtype", mf.TEXT_EMBEDDINGS, lambda: _npy_bytes(np.ones((6, 8), np.int32)), "dtype int32"),
    ("shape", mf.TEXT_EMBEDDINGS, lambda: _npy_bytes(np.ones((5, 8), np.float32)), "shape [5, 8]"),
    ("huge shape", mf.TEXT_EMBEDDINGS, None, "shape [6000000000, 8]"),
    ("garbage", mf.TEXT_EMBEDDINGS, lambda: b"hello world", "not a .npy array"),
    (
        "truncated",
        mf.TEXT_EMBEDDINGS,
        lambda: _text(0.0)[:-5],
        "bytes of data, its header declares",
    ),
    ("header", mf.TEXT_EMBEDDINGS, lambda: b"\x93NUMPY\x01\x00\x10\x00{'descr': 1", "corrupt .npy"),
    ("empty npy", mf.TEXT_EMBEDDINGS, lambda: b"", "not a .npy array"),
    ("empty onnx", mf.IMAGE_ENCODER_ONNX, lambda: b"", "is empty (0 bytes)"),
    ("classes list", mf.CLASSES_FILE, lambda: b"[1, 2]", "expected a JSON object, got a list"),
    ("classes name", mf.CLASSES_FILE, None, "classes[0].name: expected a string, got 7"),
    ("classes deep", mf.CLASSES_FILE, lambda: b"[" * 100_000, "levels deep"),
    ("classes bytes", mf.CLASSES_FILE, lambda: b"\xff\xfe\x00", "not UTF-8"),
]


def _npy_header(shape: str) -> bytes:
    """A float32 .npy header declaring ``shape`` followed by a few bytes of data."""
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}"
    header += " " * (63 - (len(header) + 10) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * 64


def _huge_header() -> bytes:
    return _npy_header("(6000000000, 8)")


def _bad_class_name(bundle: Path) -> bytes:
    data = json.loads((bundle / mf.CLASSES_FILE).read_text())
    data["classes"][0]["name"] = 7
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("case", "name", "content", "message"), COMPANION_CASES, ids=[c[0] for c in COMPANION_CASES]
)
def test_rehashed_companion_file_is_one_line(bundle, capsys, case, name, content, message) -> None:
    if case == "huge shape":
        data = _huge_header()
    elif case == "classes name":
        data = _bad_class_name(bundle)
    else:
        data = content()
    (bundle / name).write_bytes(data)
    _rehash(bundle, name)  # the sha256 matches: only the content checks can tell
    before = _snapshot(bundle)
    code, lines, _ = _edge(["info", str(bundle)], capsys)
    assert code == 1 and message in _error_line(lines)
    assert _snapshot(bundle) == before


def test_embeddings_declaring_more_rows_than_they_hold_are_refused(bundle, capsys) -> None:
    # header and manifest agree on 6e9 rows (190 GB): refused from the file size, not allocated
    (bundle / mf.TEXT_EMBEDDINGS).write_bytes(_huge_header())
    _rehash(bundle, mf.TEXT_EMBEDDINGS)
    path = bundle / mf.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["text"]["shape"] = [6_000_000_000, 8]
    manifest["labels"]["num_classes"] = 6_000_000_000
    manifest["engine"]["inputs"][1]["shape"][0] = 6_000_000_000
    manifest["engine"]["inputs"][2]["shape"][0] = 6_000_000_000
    path.write_text(json.dumps(manifest))
    code, lines, _ = _edge(["info", str(bundle)], capsys)
    assert code == 1 and "its header declares 192000000000" in _error_line(lines)


@pytest.mark.parametrize("content", [b"not an onnx model", bytes(range(256)) * 4])
def test_rehashed_non_onnx_model_fails_run_in_one_line(bundle, images, capsys, content) -> None:
    (bundle / mf.IMAGE_ENCODER_ONNX).write_bytes(content)
    _rehash(bundle, mf.IMAGE_ENCODER_ONNX)
    before = _snapshot(bundle, images)
    code, lines, _ = _edge(["run", str(bundle), str(images), "--quiet"], capsys)
    assert code == 1 and "ONNX Runtime cannot load image_encoder.onnx" in _error_line(lines)
    assert _snapshot(bundle, images) == before


# ----------------------------------------------------------------------------- state files
@pytest.fixture(scope="module")
def saved_state(pristine, images, tmp_path_factory) -> Path:
    state = tmp_path_factory.mktemp("state") / "tca.npz"
    assert cli.main(["run", str(pristine), str(images), "--state", str(state), "--quiet"]) == 0
    return state


def _rewrite_state(source: Path, target: Path, change: Callable[[dict, dict], None]) -> None:
    with np.load(source, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    meta = json.loads(str(arrays.pop("__meta__")))
    change(arrays, meta)
    np.savez(target, __meta__=np.array(json.dumps(meta)), **arrays)


def _nan_units(arrays: dict, meta: dict) -> None:
    arrays["unit_stacks"] = arrays["unit_stacks"].copy()
    arrays["unit_stacks"][0, 0, 0, 0] = np.nan


def _inf_entropies(arrays: dict, meta: dict) -> None:
    arrays["entropies"] = arrays["entropies"].copy()
    arrays["entropies"][1, 0] = np.inf


def _huge_capacity(arrays: dict, meta: dict) -> None:
    meta["config"]["capacity"] = 10**9


def _config_string(arrays: dict, meta: dict) -> None:
    meta["config"] = "imagenet"


def _layers_string(arrays: dict, meta: dict) -> None:
    meta["num_layers"] = "4"


def _counts_float(arrays: dict, meta: dict) -> None:
    arrays["counts"] = arrays["counts"].astype(np.float64)


STATE_CASES = [
    ("NaN units", _nan_units, "'unit_stacks' holds NaN values"),
    ("inf entropies", _inf_entropies, "'entropies' holds infinite values"),
    ("capacity 1e9", _huge_capacity, "is declared [6, 3, 4, 16], expected [6, 1000000000, 4, 16]"),
    ("config string", _config_string, "unusable reservoir config"),
    ("layers string", _layers_string, "num_layers=4, not 4"),
    ("float counts", _counts_float, "counts must be integers"),
]


@pytest.mark.parametrize(
    ("case", "change", "message"), STATE_CASES, ids=[c[0] for c in STATE_CASES]
)
def test_bad_state_is_refused_at_load(
    pristine, images, saved_state, tmp_path, capsys, case, change, message
) -> None:
    state = tmp_path / "state.npz"
    _rewrite_state(saved_state, state, change)
    before = _snapshot(pristine, images, state)
    code, lines, _ = _edge(["run", str(pristine), str(images), "--state", str(state)], capsys)
    line = _error_line(lines)
    assert code == 1 and message in line and str(state) in line
    assert _snapshot(pristine, images, state) == before


def _state_with_declared_shape(source: Path, target: Path) -> None:
    """A state whose unit_stacks header declares 6 x 10^9 x 4 x 16 floats (1.5 TB), data tiny."""
    import zipfile

    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        for item in archive.infolist():
            data = archive.read(item)
            if item.filename == "unit_stacks.npy":
                data = _npy_header("(6, 1000000000, 4, 16)")
            out.writestr(item, data)


RAW_STATES = [
    ("npy", lambda s, t: t.write_bytes(_npy_bytes(np.zeros(3))), "a single .npy array"),
    ("garbage", lambda s, t: t.write_bytes(b"PK\x03\x04garbage"), "not a readable state file"),
    ("empty", lambda s, t: t.write_bytes(b""), "not a readable state file"),
    ("meta int", lambda s, t: np.savez(t, __meta__=np.array(5)), "corrupt header"),
    ("meta deep", lambda s, t: np.savez(t, __meta__=np.array("[" * 100_000)), "levels deep"),
    ("meta list", lambda s, t: np.savez(t, __meta__=np.array("[1]")), "not a JSON object"),
    (
        "object array",
        lambda s, t: np.savez(t, __meta__=np.array("{}"), x=np.array([{}], dtype=object)),
        "dtype object",
    ),
    ("declared 1.5 TB", _state_with_declared_shape, "is declared [6, 1000000000, 4, 16]"),
]


@pytest.mark.parametrize(("case", "write", "message"), RAW_STATES, ids=[c[0] for c in RAW_STATES])
def test_unreadable_state_is_one_line(
    pristine, images, saved_state, tmp_path, capsys, case, write, message
) -> None:
    state = tmp_path / "state.npz"
    write(saved_state, state)
    before = _snapshot(pristine, images, state)
    code, lines, _ = _edge(["run", str(pristine), str(images), "--state", str(state)], capsys)
    assert code == 1 and message in _error_line(lines)
    assert _snapshot(pristine, images, state) == before


# ----------------------------------------------------------------------------- sizes and values
def test_reservoir_capacity_above_memory_names_one_that_fits(pristine, images, capsys) -> None:
    code, lines, _ = _edge(
        ["run", str(pristine), str(images), "--capacity", str(10**12), "--quiet"], capsys
    )
    line = _error_line(lines)
    assert code == 1 and "TCA reservoir needs" in line and "available; --capacity" in line
    fits = int(line.split("--capacity ")[1].split()[0])
    assert 1 <= fits < 10**12


ARGUMENT_CASES = [
    (["--capacity", "0"], "capacity must be an integer >= 1"),
    (["--tau", "nan"], "tau must be a finite number"),
    (["--lam=-inf"], "lam must be a finite number"),
    (["--max-pixels", "-1"], "--max-pixels: expected a whole number >= 0"),
    (["--max-pixels", "lots"], "--max-pixels: expected a whole number >= 0"),
]


@pytest.mark.parametrize(("extra", "message"), ARGUMENT_CASES)
def test_bad_values_are_one_line(pristine, images, capsys, extra, message) -> None:
    code, lines, _ = _edge(["run", str(pristine), str(images), "--quiet", *extra], capsys)
    assert code in (1, 2) and message in _error_line(lines)  # after argparse's usage lines


# ----------------------------------------------------------------------------- images and folders
def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header says width x height (one tiny compressed row follows)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (1 + 3 * min(width, 64)))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def _records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_image_above_pixel_limit_is_an_error_record(pristine, tmp_path, capsys) -> None:
    folder = tmp_path / "frames"
    write_images(folder, 1)
    _png_header_only(folder / "huge.png", 13_000, 13_000)  # 169 megapixels, a few hundred bytes
    before = _snapshot(folder)
    code, _, out = _edge(["run", str(pristine), str(folder), "--quiet"], capsys)
    records = _records(out)
    assert code == 0 and len(records) == 2
    huge = next(r for r in records if r["source"].endswith("huge.png"))
    assert "169.0 megapixels" in huge["error"] and "--max-pixels" in huge["error"]
    code, _, out = _edge(
        ["run", str(pristine), str(folder), "--quiet", "--max-pixels", "100"], capsys
    )
    assert all("error" in r for r in _records(out))  # a 100-pixel limit refuses both
    assert _snapshot(folder) == before


def test_folder_with_links_loops_and_fifos_never_hangs(pristine, tmp_path, capsys) -> None:
    folder = tmp_path / "frames"
    write_images(folder, 2)
    (folder / "dangling.jpg").symlink_to(folder / "gone.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    os.mkfifo(folder / "pipe.jpg")  # opening it for reading would block forever
    (folder / "up").symlink_to(folder)
    (folder / "self").symlink_to(".")
    code, _, out = _edge(["run", str(pristine), str(folder), "--quiet"], capsys)
    errors = {Path(r["source"]).name: r["error"] for r in _records(out) if "error" in r}
    assert code == 0
    assert "dangling symbolic link" in errors["dangling.jpg"]
    assert "symbolic link loop" in errors["loop.jpg"]
    assert "a FIFO, not a regular file" in errors["pipe.jpg"]
    # a recursive glob through two link loops classifies each real file once
    code, lines, out = _edge(["run", str(pristine), f"{folder}/**/*.jpg"], capsys)
    sources = [Path(r["source"]).name for r in _records(out)]
    assert code == 0 and sorted(sources) == sorted(
        ["img_0000.jpg", "img_0001.jpg", "dangling.jpg", "loop.jpg", "pipe.jpg"]
    )


def test_mode_i_image_with_8bit_values_is_not_dark(pristine, tmp_path, capsys) -> None:
    path = tmp_path / "int.tif"
    Image.fromarray(np.full((40, 40), 200, np.int32), "I").save(path)
    code, _, out = _edge(["run", str(pristine), str(path), "--quiet"], capsys)
    assert code == 0 and "error" not in _records(out)[0]


# ----------------------------------------------------------------------------- vlm-export
_EXPORT_PROBE = """
import json, sys
from vlm_export.export.cli import main
codes = [main(argv) for argv in json.loads(sys.argv[1])]
print(json.dumps({"codes": codes, "torch": "torch" in sys.modules}))
"""


@pytest.mark.exporter
def test_export_argument_errors_come_before_torch(tmp_path: Path) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    exists = tmp_path / "exists"
    exists.mkdir()
    out = str(tmp_path / "out")
    cases = [
        ["--out", out],
        ["--classes", str(empty), "--out", out],
        ["--classes", str(classes), "--out", str(exists)],
        ["--classes", str(classes), "--model", "ViT-B-17", "--out", out],
        ["--classes", str(classes), "--templates", "nosuch", "--out", out],
        ["--classes", str(classes), "--templates", str(classes), "--out", out],
        ["--classes", str(classes), "--tca-preset", "nosuch", "--out", out],
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", _EXPORT_PROBE, json.dumps(cases)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    report = json.loads(result.stdout)
    assert report == {"codes": [2] * len(cases), "torch": False}
    lines = result.stderr.strip().splitlines()
    assert len(lines) == len(cases) and "Traceback" not in result.stderr
    assert "no classes given" in lines[0] and "holds no class names" in lines[1]
    assert "exists" in lines[2] and "did you mean ViT-B-16" in lines[3]
    assert "unknown template set" in lines[4] and "exactly one {}" in lines[5]
    assert not (tmp_path / "out").exists()


@pytest.mark.exporter
def test_pretrained_tag_without_network_names_the_file(tmp_path: Path) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HOME": str(tmp_path / "hf"),  # an empty cache
        "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens there: no network
    }
    env.pop("HF_HUB_OFFLINE", None)
    argv = ["--model", "ViT-B-16", "--pretrained", "openai", "--classes", str(classes)]
    child = (
        "import sys; from vlm_export.export.cli import main; code = main(sys.argv[1:]); "
        "print('torch' in sys.modules); sys.exit(code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", child, *argv, "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stdout.strip() == "False"  # refused before torch was imported (seconds)
    line = result.stderr.strip().splitlines()[-1]
    assert "timm/vit_base_patch16_clip_224.openai" in line and "open_clip_pytorch_model.bin" in line
    assert "--pretrained path/to/" in line and "HF_HUB_OFFLINE=1" in line


def test_hostile_bundle_from_the_command_line_prints_no_traceback(bundle: Path) -> None:
    (bundle / mf.MANIFEST_NAME).write_text("[" * 100_000 + "]" * 100_000)
    result = subprocess.run(
        [sys.executable, "-m", "vlm_export.runtime", "info", str(bundle)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
