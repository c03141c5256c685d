"""Hugging Face export of mor-bench checkpoints (`mor-bench export CHECKPOINT --hf OUT`).

    from evals.hf.export import export_hf
    export_hf("runs/smoke-latest/mor-3-1.2e12F-s0", "hf/mor-3")   # -> what was written

Vanilla models become plain `LlamaForCausalLM` directories; recursive and MoR models get a
config class and a modelling file (`evals/hf/remote/`) that import the installed mor-bench
package. The tokenizer is written beside them for `AutoTokenizer`.
"""
