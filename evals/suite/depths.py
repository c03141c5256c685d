"""Per-token recursion depth: export and aggregation by difficulty class.

    mor-bench route RUN_DIR/mor-3-1.2e12F-s0 --text "12 + 39 = 51. the cat sat."

`depth_export` / `write_depth_export` save the depths of one sample text as
RUN_DIR/<run_id>/depth_sample.json (`evals.suite.record.DEPTH_SAMPLE`, checked by
`record.check_depth_export`), which `reports.figures` draws as a depth map; the terminal
view of `mor-bench route` is `evals.cli.display.render_routed_text`.

The depth of a token is the number of recursion steps it took (expert-choice: steps that
selected it; token-choice: the depth its router assigned). Every function returns plain
data (lists, dicts) so reports can draw it without running a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from evals.suite.record import DEPTH_SAMPLE, check_depth_export, read_json, write_json_atomic
from mor.errors import ConfigError
from mor.model import CausalLM

__all__ = ["DEFAULT_SAMPLE_TEXT", "DEPTH_SAMPLE", "check_depth_export", "depth_export",
           "depth_summary", "read_depth_export", "route_text", "token_depths",
           "write_depth_export"]


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


def route_text(model: CausalLM, tokenizer, text: str,
               max_tokens: int | None = None) -> dict[str, Any]:
    """Depth of every token of `text` (one sequence, truncated to the model's max_seq_len
    and to `max_tokens`), with each token's text piece. "tokens_routed" and "tokens_total"
    count the tokens routed and those of the whole text; "truncated" says whether the text
    was cut (callers tell the user: the depths of the rest are not computed)."""
    limit = model.cfg.max_seq_len if max_tokens is None else min(max_tokens,
                                                                  model.cfg.max_seq_len)
    all_ids = tokenizer.encode(text)
    ids = all_ids[:limit]
    if not ids:
        raise ConfigError("the text is empty after tokenization; pass some text")
    depths = token_depths(model, torch.tensor([ids]))[0].tolist()
    pieces = _pieces(tokenizer, ids)
    return {"routing": model.routing_mode if hasattr(model, "routing_mode") else None,
            "num_recursions": model.cfg.num_recursions,
            "tokens": [{"id": i, "text": p, "depth": d}
                       for i, p, d in zip(ids, pieces, depths)],
            "tokens_routed": len(ids), "tokens_total": len(all_ids),
            "truncated": len(ids) < len(all_ids)}


# A default sample: filler prose, arithmetic, recall and variable tracking, as in the
# synthetic corpus (evals/data/synthetic.py), so the depth map shows the classes side by side.
DEFAULT_SAMPLE_TEXT = (
    "The old garden painted the horse. Note that 43 + 28 = 71. 342 - 52 = 290.\n"
    "Trace this: e=19. r=e. r=r+5. t=r-1. r? 24. e? 19.\n"
    "A bird sat in the park. Every day the ship rested slowly. 97 * 4 = 388.")


def depth_export(model: CausalLM, tokenizer, text: str = DEFAULT_SAMPLE_TEXT, *,
                 max_tokens: int = 256) -> dict[str, Any]:
    """Per-token depths of `text` (at most `max_tokens` tokens) under the model's current
    evaluation routing, as plain JSON-able data:
    {"tokens": [piece], "depths": [int], "ids": [int], "routing": mode,
     "num_recursions": N_r, "router": "expert" | "token", "text": the routed text}."""
    routed = route_text(model, tokenizer, text, max_tokens=max_tokens)
    toks = routed["tokens"]
    return {"tokens": [t["text"] for t in toks], "depths": [int(t["depth"]) for t in toks],
            "ids": [int(t["id"]) for t in toks], "routing": routed["routing"],
            "num_recursions": int(routed["num_recursions"]), "router": model.cfg.router,
            "text": "".join(t["text"] for t in toks)}


def write_depth_export(path: str | Path, data: dict[str, Any]) -> Path:
    """Write a `depth_export` result as JSON (atomically); returns the path."""
    path = Path(path)
    check_depth_export(data, where=str(path))
    write_json_atomic(path, data)
    return path


def read_depth_export(path: str | Path) -> dict[str, Any]:
    """Load and check a depth export written by `write_depth_export` (RecordError if it is
    not one)."""
    path = Path(path)
    data = read_json(path)
    check_depth_export(data, where=str(path))
    return data


def _pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text of each token. Byte tokens that split a UTF-8 character come out as
    replacement characters; joined pieces of whole characters equal the decoded text."""
    return [tokenizer.decode([i]) for i in ids]
