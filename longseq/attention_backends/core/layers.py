"""Which attention layer is which: the layer number in a framework's module path (sparse and duo both need it)."""

from __future__ import annotations

import re

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(layer_name: str) -> int | None:
    """The ``<i>`` of a ``...layers.<i>....`` module path (vLLM's attention layer names), else None."""
    m = _LAYER_RE.search(layer_name)
    return None if m is None else int(m.group(1))
