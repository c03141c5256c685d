"""The command line's own bad-input error (a flag that cannot work here), reported like
`mor.errors.MorBenchError` and `evals.suite.record.RecordError`: one line, exit code 2.
Defined here so commands that must stay torch-free (`report`) need not import `mor`."""

from __future__ import annotations


class UsageError(Exception):
    """A command-line option that cannot be honoured; the message says what to do."""
