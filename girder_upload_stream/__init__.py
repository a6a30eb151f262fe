"""girder-upload-stream: rebuild files sent as OpenMSIStream chunks and upload them to Girder.

The package's pure core (no Prefect, Kafka client or Girder client) lives in
:mod:`girder_upload_stream.errors`, :mod:`girder_upload_stream.wire.codec`,
:mod:`girder_upload_stream.assembly.reassembly` and :mod:`girder_upload_stream.wire.config`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]

from girder_upload_stream.text_bounds import guard_log_records as _guard_log_records

_guard_log_records()  # no log line of the package can be forged or unbounded
