"""Store the Girder API key in a Prefect Secret block, so deployments name the block
instead of carrying the key: ``python -m girder_upload_stream.prefect_glue.secrets BLOCK_NAME`` reads
the key from ``$GIRDER_API_KEY`` (never from the command line)."""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["save_api_key_block", "main"]


def save_api_key_block(name: str, api_key: str) -> None:
    """Create or overwrite the Secret block ``name`` holding ``api_key``."""
    from prefect.blocks.system import Secret
    Secret(value=api_key).save(name, overwrite=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m girder_upload_stream.prefect_glue.secrets",
        description="Save the Girder API key of $GIRDER_API_KEY (never taken from the "
                    "command line: it would show in the process list) in the Prefect "
                    "Secret block BLOCK_NAME of the Prefect API of $PREFECT_API_URL, "
                    "replacing the block if it exists. Deployments then name the block "
                    "(parameter girder_api_key_block) instead of carrying the key.")
    parser.add_argument("block_name", metavar="BLOCK_NAME",
                        help="name of the Secret block, e.g. girder-api-key (the name "
                             "deployments/prefect.yaml uses); required, no default")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    key = os.environ.get("GIRDER_API_KEY")
    if not key:
        print("error: set GIRDER_API_KEY", file=sys.stderr)
        return 2
    save_api_key_block(args.block_name, key)
    print(f"saved the Girder API key in the Prefect Secret block {args.block_name!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
