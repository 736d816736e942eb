"""Prefect wrappers around pipeline stages (tasks pass URIs, versions and small configs, never arrays)."""
