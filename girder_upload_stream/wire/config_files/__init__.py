"""Bundled config files, found by name as OpenMSIStream finds its own.

``--config NAME`` (no dot) means ``NAME.config``; a path to an existing file wins,
then the folder named by ``OPENMSISTREAM_CONFIG_FILE_DIR`` (kept for drop-in
compatibility), then this package's folder (``local`` and ``test``).
"""

from __future__ import annotations

import os
from pathlib import Path

from girder_upload_stream.errors import ConfigError

__all__ = ["BUNDLED_DIR", "resolve_config_path"]

BUNDLED_DIR = Path(__file__).resolve().parent


def resolve_config_path(name_or_path: str | os.PathLike[str]) -> Path:
    """Turn a ``--config`` argument into the path of an existing config file."""
    text = os.fspath(name_or_path)
    candidate = text + ".config" if "." not in Path(text).name else text
    folders = [Path.cwd()]
    if os.environ.get("OPENMSISTREAM_CONFIG_FILE_DIR"):
        folders.append(Path(os.environ["OPENMSISTREAM_CONFIG_FILE_DIR"]))
    folders.append(BUNDLED_DIR)
    for folder in folders:
        path = folder / candidate
        if path.is_file():
            return path.resolve()
    raise ConfigError(f"config {text!r} is neither a file nor a bundled config "
                      f"(bundled: {', '.join(sorted(p.stem for p in BUNDLED_DIR.glob('*.config')))})",
                      path=text)
