"""Which attention layer is which: the layer number in a framework's module path (sparse and duo both need it)."""

from __future__ import annotations

import re

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(layer_name: str) -> int | None:
    """The ``<i>`` of a ``...layers.<i>....`` module path (vLLM's attention layer names), else None."""
    m = _LAYER_RE.search(layer_name)
    return None if m is None else int(m.group(1))


def is_windowed_layer_type(layer_type: str) -> bool:
    """A per-layer kind as Hugging Face configs name them (``layer_types``): ``sliding_attention`` is windowed;
    ``full_attention`` (and anything else, e.g. ``chunked_attention``) is global."""
    return "sliding" in layer_type


def global_layer_rows(layer_types: list[str] | None, num_layers: int) -> list[int | None]:
    """Per attention layer: its row among the global layers (what a duo pattern covers), None for a windowed one.

    ``layer_types``: the model's per-layer kinds, or None when the model has no windowed layers (then row = layer).
    Windowed layers keep their window and no technique (they are already cheap), so patterns skip them.
    """
    if layer_types is None:
        return list(range(num_layers))
    if len(layer_types) != num_layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
    rows, n = [], 0
    for kind in layer_types:
        windowed = is_windowed_layer_type(kind)
        rows.append(None if windowed else n)
        n += not windowed
    return rows


#: Model types whose every attention layer has learned sink logits (the config has no field for it).
SINK_MODEL_TYPES = ("gpt_oss",)


def _with(features: list[str]) -> str:
    return f"; the kernels apply {features} as the framework's do" if features else ""


def layer_plan(model_config: dict, technique: str, dense_layers: int = 0) -> list[dict]:
    """What runs on each kind of attention layer of a model (``longseq info --model``), from its HF ``config.json``.

    Returns one entry per layer kind: ``{"kind", "layers": [indices], "window", "features", "runs", "why"}``.
    ``technique``: ``dense``/``sparse``/``duo``; ``dense_layers``: sparse mode's leading dense layers.
    """
    cfg = model_config.get("text_config") or model_config
    n = cfg.get("num_hidden_layers")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"num_hidden_layers must be a positive int, got {n!r}")
    types = cfg.get("layer_types")
    window = cfg.get("sliding_window")
    if types is not None and (not isinstance(types, list) or not all(isinstance(t, str) for t in types)):
        raise ValueError("layer_types must be a list of strings")
    features = []
    if cfg.get("attn_logit_softcapping"):
        features.append("logits_soft_cap")
    if cfg.get("model_type", model_config.get("model_type")) in SINK_MODEL_TYPES:
        features.append("sinks")
    rows = global_layer_rows(types, n)
    plan: dict[str, dict] = {}  # by what runs: each outcome has one reason
    for i, row in enumerate(rows):
        windowed = row is None
        if windowed:
            runs, why = "dense, windowed", (f"keeps its {window}-token window on the framework's kernel; techniques "
                                            "apply to global layers only")
        elif technique == "sparse" and i < dense_layers:
            runs, why = "dense", f"LONGSEQ_SPARSE_DENSE_LAYERS={dense_layers} keeps the first layers dense"
        elif technique == "sparse":
            runs, why = "sparse", "top-k pages per decode query" + _with(features)
        elif technique == "duo":
            runs, why = "duo", "its row of the duo pattern (patterns have one row per global layer)" + _with(features)
        else:
            runs, why = "dense", "longseq's dense path, token-identical to the framework's"
        entry = plan.setdefault(runs, {"kind": types[i] if types else "global", "layers": [],
                                      "window": window if windowed else None, "features": features,
                                      "runs": runs, "why": why})
        entry["layers"].append(i)
    if types is None and window:
        for entry in plan.values():
            entry["why"] += (f"; note: sliding_window={window} without layer_types, so the model code decides per "
                             "layer which layers are windowed")
    return list(plan.values())
