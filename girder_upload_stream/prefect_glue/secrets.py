"""Store the Girder API key in a Prefect Secret block, so deployments name the block
instead of carrying the key: ``python -m girder_upload_stream.prefect_glue.secrets BLOCK_NAME`` reads
the key from ``$GIRDER_API_KEY`` (never from the command line)."""

from __future__ import annotations

import os
import sys

__all__ = ["save_api_key_block", "main"]


def save_api_key_block(name: str, api_key: str) -> None:
    """Create or overwrite the Secret block ``name`` holding ``api_key``."""
    from prefect.blocks.system import Secret
    Secret(value=api_key).save(name, overwrite=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m girder_upload_stream.prefect_glue.secrets BLOCK_NAME  (key in $GIRDER_API_KEY)",
              file=sys.stderr)
        return 2
    key = os.environ.get("GIRDER_API_KEY")
    if not key:
        print("error: set GIRDER_API_KEY", file=sys.stderr)
        return 2
    save_api_key_block(args[0], key)
    print(f"saved the Girder API key in the Prefect Secret block {args[0]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
