"""Rebuilding files from chunks: reassembly, hashing, confined disk writes."""
