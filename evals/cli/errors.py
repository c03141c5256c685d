"""The command line's own bad-input error (a flag that cannot work here), reported like
`mor.errors.MorBenchError` and `evals.suite.record.RecordError`: one line, exit code 2.
Defined here so commands that must stay torch-free (`report`) need not import `mor`."""

from __future__ import annotations


class UsageError(Exception):
    """A command-line option that cannot be honoured; the message says what to do."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (`--limit 0`, `--batch-size -5` are refused, exit 2)."""
    return _int_at_least(text, 1, "a positive integer")


def nonneg_int(text: str) -> int:
    """argparse type: an integer >= 0 (`--num-fewshot -1` is refused, exit 2)."""
    return _int_at_least(text, 0, "an integer >= 0")


def _int_at_least(text: str, low: int, what: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value
