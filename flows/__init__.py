"""Prefect flows of girder-upload-stream (installed as ``girder_upload_stream.flows``).

Flows only sequence work; the work itself lives in ``girder_upload_stream`` and
``girder_upload_stream.tasks``. Import through the package name, never as ``flows``.
"""
