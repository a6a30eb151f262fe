"""Our ``GirderUploadStreamProcessor`` takes every command line OpenMSIStream 1.8.8's takes.

The reference is not a list written here: the argument parser of the real 1.8.8
``GirderUploadStreamProcessor``, installed by ``make install`` in ``.venv-openmsistream``,
is read in a subprocess (its Python, its packages). Every option it defines must be
accepted by ours with the same default, and the same sample command lines must mean the
same to both, except for the documented differences in :data:`EXCEPTIONS` (each one also
listed in docs/migration.md). Nothing here needs the stack.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

import pytest

from girder_upload_stream.cli.run import add_run_arguments
from girder_upload_stream.options import consumed_topic

REPO_ROOT = Path(__file__).resolve().parents[2]
OMSI_PYTHON = REPO_ROOT / ".venv-openmsistream" / "bin" / "python"
MIGRATION = REPO_ROOT / "docs" / "migration.md"

#: dest -> why ours differs from 1.8.8's parser (each is in docs/migration.md too).
EXCEPTIONS = {
    "girder_api_key": "optional positional: $GIRDER_API_KEY is used when it is left out",
    "collection_name": "1.8.8's parser default is None, which its constructor replaces with "
                       "RUN_CONST.DEFAULT_COLLECTION_NAME; ours states that value",
}

# Runs in OpenMSIStream's venv: its parser's actions, and what it makes of each argv.
DUMP = r"""
import argparse, json, re, sys
from pathlib import Path
from openmsistream.girder.girder_upload_stream_processor import GirderUploadStreamProcessor
from openmsistream.utilities.config import RUN_CONST
parser = GirderUploadStreamProcessor.get_argument_parser()
def plain(value):
    if isinstance(value, re.Pattern): return value.pattern
    if isinstance(value, Path): return str(value)
    return value
actions = [dict(dest=a.dest, flags=a.option_strings, default=plain(a.default),
                switch=isinstance(a, argparse._StoreTrueAction), required=a.required)
           for a in parser._actions if not isinstance(a, argparse._HelpAction)]
parsed = [{k: plain(v) for k, v in vars(parser.parse_args(argv)).items()}
          for argv in json.load(sys.stdin)]
print(json.dumps(dict(actions=actions, parsed=parsed,
                      collection=RUN_CONST.DEFAULT_COLLECTION_NAME)))
"""

#: Sample command lines (after the two positionals); both programs must read them alike.
SAMPLES = [
    [],
    ["--topic_name", "lab", "--logger_stream_level", "WARNING", "--logger_file_level", "10"],
    ["--consumer_topic_name", "other", "--producer_topic_name", "p", "--topic_name", "lab"],
    ["--topic_name", "lab", "--consumer_topic_name", "test", "--logger_stream_level", "Debug"],
    ["--heartbeat_interval_secs", "12.5", "--log_interval_secs", "7", "--update_seconds", "9",
     "--n_threads", "3", "--mode", "disk", "--download_regex", "a/.*\\.txt",
     "--replace_existing", "--treat_undecryptable_as_plaintext",
     "--max_wait_per_decrypt", "2", "--max_initial_wait_per_decrypt", "3",
     "--heartbeat_topic_name", "hb", "--heartbeat_program_id", "hp",
     "--log_topic_name", "lt", "--log_program_id", "lp", "--consumer_group_id", "g",
     "--girder_root_folder_id", "abc", "--girder_root_folder_path", "x/y",
     "--collection_name", "C", "--metadata", '{"lab": "x"}'],
]


@pytest.fixture(scope="module")
def openmsistream(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """1.8.8's parser: its actions and its reading of :data:`SAMPLES`."""
    if not OMSI_PYTHON.is_file():
        pytest.fail(f"{OMSI_PYTHON} is missing: run `make install` (it installs "
                    "OpenMSIStream 1.8.8 there, the reference of this test)")
    out = tmp_path_factory.mktemp("omsi")
    argvs = [["http://g/api/v1", "key", "--output_dir", str(out / "o"), *s] for s in SAMPLES]
    done = subprocess.run([str(OMSI_PYTHON), "-c", DUMP], input=json.dumps(argvs), text=True,
                          capture_output=True, cwd=out, timeout=120)
    assert done.returncode == 0, done.stderr
    return {**json.loads(done.stdout), "argvs": argvs}


def _ours() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="GirderUploadStreamProcessor")
    add_run_arguments(parser, default_config="test")
    return parser


def _plain(value: object) -> object:
    if isinstance(value, re.Pattern):
        return value.pattern
    return str(value) if isinstance(value, Path) else value


def test_every_option_of_1_8_8_is_accepted_with_its_default(openmsistream: dict) -> None:
    ours = {a.dest: a for a in _ours()._actions}
    missing, wrong_default = [], {}
    for theirs in openmsistream["actions"]:
        dest = theirs["dest"]
        action = ours.get(dest) or next((a for a in ours.values()
                                         if a.option_strings == theirs["flags"]), None)
        if action is None or action.option_strings != theirs["flags"]:
            missing.append(theirs["flags"] or dest)
            continue
        if dest in EXCEPTIONS:
            continue
        if _plain(action.default) != theirs["default"]:
            wrong_default[dest] = (action.default, theirs["default"])
    assert not missing, f"options of OpenMSIStream 1.8.8 that ours refuses: {missing}"
    assert not wrong_default, f"(ours, 1.8.8's) defaults that differ: {wrong_default}"


def test_the_documented_exceptions_hold_and_are_documented(openmsistream: dict) -> None:
    theirs = {a["dest"]: a for a in openmsistream["actions"]}
    ours = {a.dest: a for a in _ours()._actions}
    assert theirs["girder_api_key"]["required"] and not ours["girder_api_key"].required
    assert theirs["collection_name"]["default"] is None
    assert ours["collection_name"].default == openmsistream["collection"]
    text = MIGRATION.read_text(encoding="utf-8")
    for dest in EXCEPTIONS:
        assert f"`{dest}`" in text or f"`--{dest}`" in text, f"{dest} not in migration.md"


# Values that differ only in type: 1.8.8 keeps --metadata as text, the config as a path.
def _same(dest: str, ours: object, theirs: object) -> bool:
    if dest == "metadata" and isinstance(theirs, str):
        return ours == json.loads(theirs)
    if dest == "config":
        return Path(str(theirs)).stem == str(ours)
    if dest == "collection_name" and theirs is None:
        return ours is not None
    return _plain(ours) == theirs


@pytest.mark.parametrize("index", range(len(SAMPLES)))
def test_sample_command_lines_mean_the_same(openmsistream: dict, index: int) -> None:
    theirs = openmsistream["parsed"][index]
    parser = _ours()
    args = parser.parse_args(openmsistream["argvs"][index])
    # Our name of each of their options (ours keeps --logger_file_path in logs_dir).
    flags = {tuple(a["flags"]) or (a["dest"],): a["dest"] for a in openmsistream["actions"]}
    our_dest = {flags[tuple(a.option_strings) or (a.dest,)]: a.dest for a in parser._actions
                if (tuple(a.option_strings) or (a.dest,)) in flags}
    differ = {dest: (_plain(getattr(args, our_dest[dest])), value)
              for dest, value in theirs.items()
              if dest not in ("consumer_topic_name", "producer_topic_name")
              and not _same(dest, getattr(args, our_dest[dest]), value)}
    assert not differ, f"(ours, 1.8.8's) readings that differ: {differ}"
    # 1.8.8 consumes --consumer_topic_name, which it sets from --topic_name when left alone.
    assert consumed_topic(args) == theirs["consumer_topic_name"]
