"""Every girder-client call: folders, items, files, metadata."""
