"""Errors that mor-bench reports to users as one line (the CLI exits with code 2, no traceback)."""

from __future__ import annotations


class MorBenchError(Exception):
    """Base class: a problem with the user's input that they can fix.

    The message must name the offending field, file or value and say what to do.
    """


class ConfigError(MorBenchError, ValueError):
    """An invalid or unsupported model / suite / training configuration."""


class DataError(MorBenchError, ValueError):
    """A corpus, tokenizer or dataset that cannot be read or used."""
