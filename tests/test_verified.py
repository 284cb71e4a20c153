"""Bundles verified once and remembered (core.verified): what is hashed again, what is ignored."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fakebundle import make_bundle

from vlm_export.core import verified
from vlm_export.core.errors import BundleError, UserError
from vlm_export.core.manifest import read_manifest
from vlm_export.runtime import cli
from vlm_export.runtime.bundle import Bundle


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("VLM_EXPORT_CACHE", str(folder))
    monkeypatch.setattr(verified, "SETTLE_NS", 0)  # files written just now may be remembered
    return folder


@pytest.fixture
def bundle(tmp_path) -> Path:
    return make_bundle(tmp_path / "bundle", method="tca")


def _verify(folder: Path, mode: str = "cached") -> verified.Verification:
    return verified.verify_bundle_files(folder, read_manifest(folder), mode)


def test_the_second_start_hashes_nothing(cache, bundle, monkeypatch) -> None:
    listed = sorted(read_manifest(bundle)["files"])
    first = _verify(bundle)
    assert sorted(first.hashed) == listed and first.remembered == []
    reads = []
    monkeypatch.setattr(verified, "sha256_file", lambda path: reads.append(path))
    second = _verify(bundle)
    assert second.hashed == [] and sorted(second.remembered) == listed and reads == []
    assert [p.name for p in bundle.iterdir() if p.name.startswith(".")] == []  # bundle untouched


def test_a_change_with_size_and_mtime_restored_is_still_caught(cache, bundle) -> None:
    _verify(bundle)
    onnx = bundle / read_manifest(bundle)["engine"]["onnx"]
    before = onnx.stat()
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 0xFF
    onnx.write_bytes(bytes(data))  # same size, same inode
    os.utime(onnx, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime set back; ctime moved
    assert onnx.stat().st_size == before.st_size and onnx.stat().st_mtime_ns == before.st_mtime_ns
    with pytest.raises(BundleError, match="does not match its sha256"):
        _verify(bundle)


def test_only_changed_files_are_hashed_again(cache, bundle) -> None:
    _verify(bundle)
    name = read_manifest(bundle)["labels"]["file"]
    content = (bundle / name).read_bytes()
    (bundle / name).unlink()
    (bundle / name).write_bytes(content)  # same bytes, a new inode
    again = _verify(bundle)
    assert again.hashed == [name] and name not in again.remembered
    assert _verify(bundle).hashed == []


def test_full_hashes_everything_and_files_written_just_now_are_not_remembered(
    cache, bundle, monkeypatch
) -> None:
    listed = sorted(read_manifest(bundle)["files"])
    _verify(bundle)
    assert sorted(_verify(bundle, "full").hashed) == listed
    assert _verify(bundle).hashed == []
    monkeypatch.setattr(verified, "SETTLE_NS", 3600 * 10**9)  # every file changed "just now"
    fresh = make_bundle(bundle.parent / "fresh", method="zeroshot")
    assert sorted(_verify(fresh).hashed) == sorted(read_manifest(fresh)["files"])
    assert sorted(_verify(fresh).hashed) == sorted(read_manifest(fresh)["files"])


@pytest.mark.parametrize(
    "damage",
    ["garbage", "foreign", "wrong_format", "bad_entry", "symlink"],
)
def test_a_damaged_or_foreign_record_is_not_trusted(cache, bundle, tmp_path, damage) -> None:
    listed = sorted(read_manifest(bundle)["files"])
    _verify(bundle)
    record = verified.record_path(bundle)
    data = json.loads(record.read_text())
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    if damage == "garbage":
        record.write_bytes(b"\x00{not json")
    elif damage == "foreign":  # the record of another folder holding the same files
        data["folder"] = data["folder"].replace("bundle", "elsewhere")
        record.write_text(json.dumps(data))
    elif damage == "wrong_format":
        data["format"] = "something-else"
        record.write_text(json.dumps(data))
    elif damage == "bad_entry":
        for entry in data["files"].values():
            entry["sha256"] = "not a hash"
        record.write_text(json.dumps(data))
    else:
        record.unlink()
        record.symlink_to(victim)
    assert sorted(_verify(bundle).hashed) == listed
    assert victim.read_text() == "keep me"  # never written through a link
    if damage != "symlink":
        assert _verify(bundle).hashed == []  # a good record was written in its place


def test_no_writable_cache_only_means_hashing(tmp_path, bundle, monkeypatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("VLM_EXPORT_CACHE", str(blocker))
    monkeypatch.setattr(verified, "SETTLE_NS", 0)
    listed = sorted(read_manifest(bundle)["files"])
    assert sorted(_verify(bundle).hashed) == listed
    assert sorted(_verify(bundle).hashed) == listed
    assert blocker.read_text() == ""


def test_bundle_open_modes(cache, bundle) -> None:
    for mode in (True, False, "cached", "full", "off"):
        assert Bundle.open(bundle, verify=mode).classes
    with pytest.raises(UserError, match="verify must be one of"):
        Bundle.open(bundle, verify="sometimes")


def test_cli_verify_options(cache, bundle, capsys) -> None:
    assert cli.main(["info", str(bundle), "--verify", "full"]) == 0
    assert cli.main(["info", str(bundle)]) == 0
    assert cli.main(["info", str(bundle), "--no-verify"]) == 0
    onnx = bundle / read_manifest(bundle)["engine"]["onnx"]
    stamp = onnx.stat()
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 0xFF
    onnx.write_bytes(bytes(data))
    os.utime(onnx, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    capsys.readouterr()
    assert cli.main(["info", str(bundle)]) == 1
    assert "does not match its sha256" in capsys.readouterr().err
    assert cli.main(["info", str(bundle), "--no-verify"]) == 0
