"""Evaluation side of mor-bench: corpora, tokenizers, data preparation and benchmark suites."""
