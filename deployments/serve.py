"""The simplest way to run girder-upload-stream as a deployment: no work pool, no worker.

    export PREFECT_API_URL=http://127.0.0.1:24200/api   # make prefect-up
    eval "$(make -s stack-env)"                          # or your own Kafka and Girder
    .venv/bin/python deployments/serve.py

Then trigger runs from the UI or with
``prefect deployment run 'girder-upload-stream/serve' -p topic_name=T``. The API key
comes from ``GIRDER_API_KEY`` in this process's environment (runs inherit it).
"""

from __future__ import annotations

import os

from girder_upload_stream.flows.upload_stream import upload_stream

if __name__ == "__main__":
    upload_stream.serve(
        name=os.environ.get("GUS_SERVE_NAME", "serve"),
        parameters={"config": "local", "girder_api_url": os.environ.get("GIRDER_API_URL"),
                    "max_idle_seconds": None},
        tags=["girder-upload-stream"],
    )
