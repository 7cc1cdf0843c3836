"""The commands in README.md and docs/ are written as they run: every ``joey ...`` line parses with
joey's own parser (methods named as joey knows them), every ``python benchmarks/...`` script exists
and takes the options it is given, Ray's import paths and config files exist, and nothing the user
reads or runs refers to files outside the project."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

from joey.bench.runners import all_methods
from joey.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from doc_commands import PAGES, commands  # noqa: E402 (tools/ is not a package)

ALL = [(page.relative_to(ROOT).as_posix(), argv) for page in PAGES for argv in commands(page)]


def _joey_argv(argv: list[str]) -> list[str] | None:
    """The arguments after ``joey`` (also behind ``torchrun``/``accelerate launch ... -m joey``)."""
    if argv[0] == "joey":
        return argv[1:]
    if argv[0] in ("torchrun", "accelerate") and "-m" in argv:
        i = argv.index("-m")
        return argv[i + 2 :] if argv[i + 1] == "joey" else None
    return None


@pytest.mark.parametrize("page,argv", [c for c in ALL if _joey_argv(c[1]) is not None],
                         ids=lambda x: " ".join(x)[:60] if isinstance(x, list) else x)
def test_every_joey_command_in_the_docs_parses(page, argv):
    rest = _joey_argv(argv)
    try:
        args = build_parser().parse_args(rest)
    except SystemExit:
        pytest.fail(f"{page}: `{' '.join(argv)}` does not parse")
    known = set(all_methods()) | {"auto"}
    for name in (getattr(args, "methods", None) or "").split(",") + [getattr(args, "method", None) or "auto"]:
        assert not name or name in known, f"{page}: unknown method {name!r} in `{' '.join(argv)}`"


@pytest.mark.parametrize("page,argv", [c for c in ALL if c[1][0] == "python" and c[1][1].startswith("benchmarks/")],
                         ids=lambda x: " ".join(x)[:60] if isinstance(x, list) else x)
def test_every_benchmark_script_in_the_docs_exists_and_takes_its_options(page, argv):
    script = ROOT / argv[1]
    assert script.is_file(), f"{page}: {argv[1]} does not exist"
    source = script.read_text()
    # a flag is one word; "--replicas 2 ..." is the value of --joey-args, not an option of the script
    for flag in (a.split("=")[0] for a in argv[2:] if re.fullmatch(r"--[a-z0-9-]+(=.*)?", a)):
        assert f'"{flag}"' in source, f"{page}: {argv[1]} has no option {flag}"


def test_ray_entry_points_in_the_docs_exist():
    for page, argv in ALL:
        if argv[:2] == ["serve", "run"] and ":" in argv[2]:
            module, attr = argv[2].split(":")
            assert hasattr(importlib.import_module(module), attr), f"{page}: {argv[2]}"
        if argv[:2] == ["serve", "deploy"]:
            assert (ROOT / argv[2]).is_file(), f"{page}: {argv[2]}"


def test_nothing_a_user_reads_or_runs_refers_outside_the_project():
    files = [*PAGES, ROOT / "run.sh", *sorted((ROOT / "joey").rglob("*.py"))]
    outside = [f.relative_to(ROOT).as_posix() for f in files if "../shared" in f.read_text()]
    assert not outside, f"these refer to ../shared: {outside}"


def test_the_docs_have_commands_to_check():
    assert len(ALL) > 40  # a change in the page format must not make these tests check nothing
