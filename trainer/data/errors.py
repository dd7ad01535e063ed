"""The one exception type that data loaders raise for bad or missing data."""

from __future__ import annotations


class DataError(ValueError):
    """Data that cannot be loaded; the message names the file or folder and how to fix it."""
