"""Per-token recursion depth: export, aggregation by difficulty class, terminal display.

    mor-bench route RUN_DIR/mor-3-1.2e12F-s0 --text "12 + 39 = 51. the cat sat."

The depth of a token is the number of recursion steps it took (expert-choice: steps that
selected it; token-choice: the depth its router assigned). Every function returns plain
data (lists, dicts) so reports can draw it without running a model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mor.errors import ConfigError
from mor.model import CausalLM


@torch.no_grad()
def token_depths(model: CausalLM, ids: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """[N, T] token ids -> [N, T] recursion depths, in the model's current routing mode
    (eval mode: its `eval_routing`)."""
    if model.cfg.family != "mor":
        raise ConfigError(f"only MoR models route tokens; this checkpoint is "
                          f"{model.cfg.family!r}")
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, ids.shape[0], batch_size):
        out.append(model(ids[i:i + batch_size].to(device)).depths.cpu())
    return torch.cat(out)


def depth_summary(depths: torch.Tensor, num_recursions: int,
                  classes: torch.Tensor | None = None,
                  class_names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Mean depth, the share of tokens at each depth, and (given per-token difficulty
    classes) the mean depth and token count of each class."""
    d = depths.flatten().long()
    hist = torch.bincount(d, minlength=num_recursions + 1)[: num_recursions + 1].float()
    out: dict[str, Any] = {
        "mean_depth": float(d.float().mean()),
        "depth_share": {str(i): float(hist[i] / d.numel()) for i in range(num_recursions + 1)},
    }
    if classes is not None:
        c = classes.flatten().long()
        by_class = {}
        for cid in torch.unique(c).tolist():
            mask = c == cid
            name = class_names[cid] if class_names and cid < len(class_names) else str(cid)
            by_class[name] = {"mean_depth": float(d[mask].float().mean()),
                              "tokens": int(mask.sum())}
        out["by_class"] = by_class
    return out


def route_text(model: CausalLM, tokenizer, text: str) -> dict[str, Any]:
    """Depth of every token of `text` (one sequence, truncated to the model's max_seq_len),
    with each token's text piece."""
    ids = tokenizer.encode(text)[: model.cfg.max_seq_len]
    if not ids:
        raise ConfigError("the text is empty after tokenization; pass some text")
    depths = token_depths(model, torch.tensor([ids]))[0].tolist()
    pieces = _pieces(tokenizer, ids)
    return {"routing": model.routing_mode if hasattr(model, "routing_mode") else None,
            "num_recursions": model.cfg.num_recursions,
            "tokens": [{"id": i, "text": p, "depth": d}
                       for i, p, d in zip(ids, pieces, depths)]}


def _pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text of each token. Byte tokens that split a UTF-8 character come out as
    replacement characters; joined pieces of whole characters equal the decoded text."""
    return [tokenizer.decode([i]) for i in ids]


_STYLES = ["grey50", "cyan", "green", "yellow", "bold magenta", "bold red"]


def render_routed_text(routed: dict[str, Any]) -> Any:
    """A `rich.text.Text` with every token coloured by its depth, plus a legend."""
    from rich.text import Text

    nr = routed["num_recursions"]
    text = Text()
    for tok in routed["tokens"]:
        text.append(tok["text"], style=_STYLES[min(tok["depth"], len(_STYLES) - 1)])
    legend = Text("\n\ndepth: ")
    for depth in range(nr + 1):
        legend.append(f" {depth} ", style=f"reverse {_STYLES[min(depth, len(_STYLES) - 1)]}")
    counts = np.bincount([t["depth"] for t in routed["tokens"]], minlength=nr + 1)
    legend.append("   tokens per depth: " + ", ".join(f"{d}: {c}" for d, c in enumerate(counts)))
    return text + legend
