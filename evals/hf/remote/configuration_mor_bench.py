"""Hugging Face configuration of a mor-bench model (written by `mor-bench export --hf`).

The model itself is described by `mor_config`: the fields of `mor.ModelConfig` exactly as
mor-bench stored them, from which `modeling_mor_bench.py` builds the model with the installed
mor-bench package. The usual Hugging Face names (`vocab_size`, `hidden_size`,
`max_position_embeddings`, ...) are copies for tools that read them; the model ignores them.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class MorBenchConfig(PretrainedConfig):
    """A mor-bench model (recursive or Mixture-of-Recursions) as a Hugging Face config."""

    model_type = "mor_bench"

    def __init__(self, mor_config: dict[str, Any] | None = None, routing: str | None = None,
                 **kwargs: Any) -> None:
        self.mor_config = dict(mor_config or {})
        self.routing = routing
        """How the model routes in `forward`: "causal" (expert-choice MoR under the causal
        rule), "token" (token-choice MoR) or None (no router)."""
        mc = self.mor_config
        if mc:  # copies under Hugging Face's names, for tools that read them
            kwargs.setdefault("vocab_size", mc.get("vocab_size"))
            kwargs.setdefault("hidden_size", mc.get("d_model"))
            kwargs.setdefault("intermediate_size", mc.get("d_ff"))
            kwargs.setdefault("num_attention_heads", mc.get("n_heads"))
            kwargs.setdefault("num_key_value_heads", mc.get("n_kv_heads"))
            kwargs.setdefault("num_hidden_layers", mc.get("n_layers"))
            kwargs.setdefault("max_position_embeddings", mc.get("max_seq_len"))
        kwargs.setdefault("tie_word_embeddings", True)
        kwargs.setdefault("use_cache", False)
        super().__init__(**kwargs)
