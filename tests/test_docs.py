"""The documentation site: the CLI reference is current, the site builds, its pages exist."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REFERENCE = DOCS / "reference" / "cli.md"
#: pages that come with the `vlm-edge serve` command (written with it)
SERVE_PAGES = {"serve.md", "serve-http.md"}

sys.path.insert(0, str(DOCS))
import gen_cli_reference  # noqa: E402


def _nav_pages(entries: list) -> list[str]:
    pages = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def _expected_missing() -> set[str]:
    """Pages allowed to be absent: the service's pages while the service command is absent."""
    from vlm_export.runtime.cli import build_parser

    return set() if "serve" in gen_cli_reference._subcommands(build_parser()) else SERVE_PAGES


def _help_of(main, argv: list[str], capsys, monkeypatch) -> str:
    """What ``COMMAND ARGV --help`` prints, through the command's own entry function."""
    monkeypatch.setenv("COLUMNS", gen_cli_reference.WIDTH)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("PYTHON_COLORS", "0")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main([*argv, "--help"])
    assert stopped.value.code == 0
    return capsys.readouterr().out


def test_reference_is_the_generated_page() -> None:
    page = REFERENCE.read_text(encoding="utf-8")
    made = f"Python {sys.version_info.major}.{sys.version_info.minor}'s argparse"
    if made not in page:  # another Python formats help differently: every option still listed
        for command, text in gen_cli_reference.help_texts():
            options = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", text))
            section = page.split(f"## {command}\n", 1)[1].split("\n## ", 1)[0]
            assert options <= set(re.findall(r"(?<![\w-])--[a-z][\w-]*", section)), command
        return
    assert page == gen_cli_reference.render(), "run: python docs/gen_cli_reference.py"


def test_every_commands_help_appears_in_the_reference(capsys, monkeypatch) -> None:
    from vlm_export.export.cli import main as export_main
    from vlm_export.runtime.cli import build_parser
    from vlm_export.runtime.cli import main as edge_main

    page = REFERENCE.read_text(encoding="utf-8")
    if f"Python {sys.version_info.major}.{sys.version_info.minor}'s" not in page:
        pytest.skip("the reference was formatted by another Python's argparse")
    edge_commands = sorted(gen_cli_reference._subcommands(build_parser()))
    assert {"run", "info", "explain", "classes", "learn", "eval", "merge", "bench"} <= set(
        edge_commands
    )
    runs = [(export_main, []), (export_main, ["build-engine"]), (export_main, ["quantize"])]
    runs += [(export_main, ["build-rknn"])]
    runs += [(edge_main, [])] + [(edge_main, [name]) for name in edge_commands]
    for main, argv in runs:
        text = _help_of(main, argv, capsys, monkeypatch)
        assert text.strip() and text.rstrip() in page, argv


def test_nav_and_readme_name_pages_that_exist() -> None:
    yaml = pytest.importorskip("yaml")  # comes with mkdocs ([dev])
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    missing = [page for page in _nav_pages(config["nav"]) if not (DOCS / page).is_file()]
    assert set(missing) <= _expected_missing()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\(docs/([^)#]+)", readme))
    assert {"install.md", "export.md", "device.md", "reference/cli.md"} <= linked
    gone = {page for page in linked if not (DOCS / page).is_file()}
    assert gone <= _expected_missing()
    assert not (ROOT / "spec").exists() and "spec/tca.md" not in readme


def test_the_site_builds_strictly(tmp_path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[dev]')")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "reference" / "cli" / "index.html").is_file()
    assert (tmp_path / "methods" / "tca" / "index.html").is_file()


def test_the_readme_picture_names_every_command() -> None:
    from vlm_export.runtime.cli import build_parser

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    picture = readme.split("```\n", 2)[1]  # the first plain block: the picture
    for name in gen_cli_reference._subcommands(build_parser()):
        assert f"vlm-edge {name} " in picture, name
    for command in ("vlm-export ", "vlm-export quantize", "vlm-export build-engine", "serve"):
        assert command in picture
