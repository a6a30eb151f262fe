"""The command lines: girder-upload-stream, GirderUploadStreamProcessor, make demo."""
