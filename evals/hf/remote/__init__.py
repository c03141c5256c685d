"""The two files `mor-bench export --hf` writes next to the weights of a recursive or MoR
model (`configuration_mor_bench.py`, `modeling_mor_bench.py`): Hugging Face remote code that
imports the installed mor-bench package instead of copying its model code. They are real
modules here so they are linted and tested; `evals.hf.export` copies their source."""
