"""The simplest way to run girder-upload-stream as a deployment: no work pool, no worker.

    export PREFECT_API_URL=http://127.0.0.1:24200/api   # make prefect-up
    eval "$(make -s stack-env)"                          # or your own Kafka and Girder
    .venv/bin/python deployments/serve.py

Then trigger runs from the UI or with
``prefect deployment run 'girder-upload-stream/serve' -p topic_name=T``. The API key
comes from ``GIRDER_API_KEY`` in this process's environment (runs inherit it).
"""

from __future__ import annotations

import argparse
import os


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deployments/serve.py",
        description="Serve the flow girder-upload-stream as a deployment of the Prefect API "
                    "of $PREFECT_API_URL, in this process (no work pool, no worker), until "
                    "Ctrl-C. Runs are triggered from the Prefect UI or with `prefect "
                    "deployment run 'girder-upload-stream/NAME' -p topic_name=T`; they use "
                    "the bundled 'local' config ($KAFKA_BOOTSTRAP_SERVERS), the Girder of "
                    "$GIRDER_API_URL and the key of $GIRDER_API_KEY, inherited from this "
                    "process.")
    parser.add_argument("--name", default=os.environ.get("GUS_SERVE_NAME", "serve"),
                        help="name of the deployment (default: %(default)s; "
                             "$GUS_SERVE_NAME sets it)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    from girder_upload_stream.flows.upload_stream import upload_stream  # seconds: after --help
    upload_stream.serve(
        name=args.name,
        parameters={"config": "local", "girder_api_url": os.environ.get("GIRDER_API_URL"),
                    "max_idle_seconds": None},
        tags=["girder-upload-stream"],
    )


if __name__ == "__main__":
    main()
