"""Prefect tasks of girder-upload-stream (installed as ``girder_upload_stream.tasks``).

Thin ``@task`` wrappers around the I/O modules; retries live here and only here.
"""
