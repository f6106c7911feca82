"""Exceptions of the data pipeline; every message names the file or shard at fault."""

from __future__ import annotations


class DataError(RuntimeError):
    """Input text or shards that cannot be used; the message names the file or shard."""


class BadSample(ValueError):
    """One shard sample fails validation.

    ``reason`` is a short code counted in the loader's statistics:
    ``wrong_dtype``, ``missing_ids``, ``missing_json``, ``bad_json``, ``bad_length``,
    ``corrupt`` (token count or checksum mismatch), ``empty``, ``id_out_of_range``.
    """

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(f"{reason}: {detail}")
