"""The documentation's option tables match the programs, and its links resolve.

``docs/configuration.md`` introduces each table with an HTML comment:

* ``<!-- options-table: COMMAND -->``: every option of COMMAND, with its default. The
  set of ``--options`` must equal the one ``COMMAND --help`` prints, and each default
  cell must state the parser's default;
* ``<!-- flow-parameters-table -->``: the flow's parameters and their defaults.

Nothing here needs the stack.
"""

from __future__ import annotations

import argparse
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from girder_upload_stream.cli import main as cli
from girder_upload_stream.cli import run as cli_run

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGURATION = REPO_ROOT / "docs" / "configuration.md"
DOC_FILES = sorted((REPO_ROOT / "docs").glob("*.md")) + [REPO_ROOT / "README.md"]
OPTION = re.compile(r"--[a-z][a-z0-9_]*")

# How to print each command's help without relying on console scripts being on PATH.
HELP_CODE = {
    "GirderUploadStreamProcessor":
        "from girder_upload_stream.cli.run import processor_main; processor_main(['--help'])",
    "girder-upload-stream run":
        "from girder_upload_stream.cli.main import main; main(['run', '--help'])",
    "girder-upload-stream produce":
        "from girder_upload_stream.cli.main import main; main(['produce', '--help'])",
    "girder-upload-stream": "from girder_upload_stream.cli.main import main; main(['--help'])",
}


def _table_after(marker: str) -> list[list[str]]:
    """The body rows (cells, stripped) of the Markdown table following ``marker``."""
    lines = CONFIGURATION.read_text(encoding="utf-8").splitlines()
    assert f"<!-- {marker} -->" in lines, f"no '<!-- {marker} -->' in {CONFIGURATION.name}"
    start = lines.index(f"<!-- {marker} -->") + 1
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    assert len(rows) > 2, f"the table after {marker} is empty"
    return rows[2:]  # without the header and the --- line


def _documented_options(command: str) -> dict[str, str]:
    """``{--option: default cell}`` of the options table of ``command``."""
    documented = {}
    for first, default, *_ in _table_after(f"options-table: {command}"):
        for option in OPTION.findall(first):
            documented[option] = default
    return documented


def _help_options(command: str) -> set[str]:
    result = subprocess.run([sys.executable, "-c", HELP_CODE[command]], text=True,
                            capture_output=True, cwd=REPO_ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    return set(OPTION.findall(result.stdout))


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _processor_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    cli_run.add_run_arguments(parser, default_config="test")
    return parser


PARSERS = {
    "GirderUploadStreamProcessor": _processor_parser,
    "girder-upload-stream run": lambda: _subparser("run"),
    "girder-upload-stream produce": lambda: _subparser("produce"),
    "girder-upload-stream": cli.build_parser,
}
# The run command shares the GirderUploadStreamProcessor table.
TABLE_OF = {"girder-upload-stream run": "GirderUploadStreamProcessor"}


def _states_default(cell: str, default: object) -> bool:
    """Whether a table cell states ``default`` (as the reader would understand it)."""
    text = cell.replace("`", "").lower()
    if default is None:
        return text.startswith("none") or text.startswith("required")
    if isinstance(default, bool):
        return (str(default).lower() in text) or (not default and "off" in text)
    if isinstance(default, re.Pattern):
        default = default.pattern
    return str(default).lower() in text


@pytest.mark.parametrize("command", sorted(HELP_CODE))
def test_options_table_matches_help(command: str) -> None:
    documented = set(_documented_options(TABLE_OF.get(command, command)))
    shown = _help_options(command)
    assert documented - shown == set(), f"documented but not in `{command} --help`"
    assert shown - documented == set(), f"in `{command} --help` but not documented"


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_options_table_states_the_defaults(command: str) -> None:
    documented = _documented_options(TABLE_OF.get(command, command))
    wrong = {}
    for action in PARSERS[command]()._actions:
        if action.help == argparse.SUPPRESS or action.default == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._SubParsersAction) or not action.option_strings:
            continue
        option = next(o for o in action.option_strings if o.startswith("--"))
        if not _states_default(documented[option], action.default):
            wrong[option] = (documented[option], action.default)
    assert not wrong, f"default cells that do not state the parser's default: {wrong}"


def test_positional_arguments_are_documented() -> None:
    rows = _table_after("options-table: GirderUploadStreamProcessor")
    firsts = " ".join(row[0] for row in rows)
    for action in _processor_parser()._actions:
        if not action.option_strings:
            assert f"`{action.dest}`" in firsts, action.dest


def test_flow_parameters_table_matches_the_flow() -> None:
    from girder_upload_stream.flows.upload_stream import upload_stream
    parameters = inspect.signature(upload_stream.fn).parameters
    rows = _table_after("flow-parameters-table")
    documented = {row[0].strip("`"): row[1] for row in rows}
    assert list(documented) == list(parameters), "parameters missing, extra or out of order"
    wrong = {name: (cell, parameters[name].default) for name, cell in documented.items()
             if not _states_default(cell, parameters[name].default)}
    assert not wrong, f"default cells that do not state the flow's default: {wrong}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


@pytest.mark.parametrize("path", DOC_FILES, ids=[p.name for p in DOC_FILES])
def test_relative_links_resolve(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(target)
    assert not broken, f"broken links in {path.name}: {broken}"


def test_doc_test_markers_precede_bash_blocks() -> None:
    for path in DOC_FILES:
        lines = path.read_text(encoding="utf-8").splitlines()
        for index, line in enumerate(lines):
            if line.strip() == "<!-- doc-test -->":
                following = lines[index + 1].strip() if index + 1 < len(lines) else ""
                assert following == "```bash", f"{path.name}:{index + 1}"


def test_options_are_defined_once_for_the_flow_and_both_commands() -> None:
    """The flow's defaults are the options' defaults, and both commands parse to them."""
    import inspect

    from girder_upload_stream.flows.upload_stream import upload_stream
    from girder_upload_stream.options import OPTIONS, flow_arguments
    signature = inspect.signature(upload_stream.fn).parameters
    own = {"config", "girder_api_url", "girder_api_key", "girder_api_key_block", "interactive"}
    flow_options = {o.name: o for o in OPTIONS if o.flow}
    assert set(signature) - own == set(flow_options), "a flow parameter is not an option"
    for name, option in flow_options.items():
        assert signature[name].default == option.default, name
    for command in (cli.build_parser().parse_args(["run", "http://g/api/v1"]),
                    _processor_parser().parse_args(["http://g/api/v1"])):
        parsed = flow_arguments(command)
        for name, option in flow_options.items():
            expected = option.to_flow(option.default) if option.to_flow else option.default
            assert parsed[name] == expected, name
