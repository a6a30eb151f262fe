"""Prefect-specific glue: artifacts of the registries, Secret blocks, deployments."""
