"""Converters from each benchmark's native layout to the index (`meta.json`); the table lives in `registry`."""
