"""DuoAttention head patterns, framework-free: the pattern files (load, save, validate) and random patterns.

A pattern gives every KV head of every layer a gate in [0, 1]; a higher gate means the head is more
retrieval-like. Which heads then stream is :class:`longseq.attention_backends.core.duo.StreamingHeadMask`.

Pattern format (the DuoAttention authors' published format, ``attn_patterns/<model>/<run>/`` in their
repository): a folder with
  ``full_attention_heads.tsv``: one row per layer, one column per KV head, tab-separated gate values in
      [0, 1] (``numpy.savetxt`` writes them as ``%.18e``);
  ``config.json``: a JSON object with at least ``sink_size`` and ``recent_size`` (the sizes used in
      calibration); every other key (the authors store their whole training configuration) is kept in
      :attr:`DuoPattern.meta` and written back unchanged.
Files are read defensively: a bad cell, a ragged row, unreadable JSON or a missing size is a
:class:`LongSeqConfigError` naming the pattern and the file.

Built-in patterns live in ``longseq/attention_backends/core/duo_patterns/<name>/`` (package data) and are
loaded by name: ``load_duo_pattern("smollm2-135m-instruct")``. The name ``random`` (or ``random:<seed>``, seed 0
by default) is no file: :func:`random_pattern` builds one for the model's shape (see
:func:`longseq.attention_backends.core.duo.rank_streaming_mask`), for shape-only benchmarks (dummy weights) and
as the "random heads at the same sparsity" control.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch

from longseq.config import LongSeqConfigError

GATES_FILE = "full_attention_heads.tsv"
CONFIG_FILE = "config.json"

#: Streaming sizes for patterns that carry none (random patterns) when the config does not set them.
DEFAULT_SINK_SIZE = 64
DEFAULT_RECENT_SIZE = 256

#: Folder of the built-in patterns (one sub-folder per name, in the format above).
BUILTIN_PATTERN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "duo_patterns")


def check_size(value: Any, name: str, source: str) -> int:
    """``value`` as a positive int (an integral float such as ``64.0`` is accepted), else a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()):
        raise LongSeqConfigError(f"duo pattern {source}: {name}={value!r} must be a positive integer")
    if value <= 0:
        raise LongSeqConfigError(f"duo pattern {source}: {name}={value!r} must be a positive integer")
    return int(value)


@dataclasses.dataclass
class DuoPattern:
    """One model's DuoAttention gates.

    Attributes:
        gates: ``[num_layers, num_kv_heads]`` float64 tensor of gate values in [0, 1] (higher = retrieval).
        sink_size, recent_size: the streaming sizes stored with the pattern (positive ints).
        meta: every other key of ``config.json``, kept as is.
        source: where the pattern came from (a folder, a built-in name, ``random(...)``), for messages.
    """

    gates: torch.Tensor
    sink_size: int
    recent_size: int
    meta: dict = dataclasses.field(default_factory=dict)
    source: str = "<in memory>"

    def __post_init__(self) -> None:
        g = self.gates if isinstance(self.gates, torch.Tensor) else torch.as_tensor(self.gates, device="cpu")
        g = g.detach().to("cpu", torch.float64)
        if g.dim() != 2 or g.numel() == 0:
            raise LongSeqConfigError(f"duo pattern {self.source}: gates must be a non-empty [num_layers, "
                                     f"num_kv_heads] table, got shape {tuple(g.shape)}")
        bad = ~((g >= 0) & (g <= 1))  # NaN is bad too
        if bad.any():
            layer, head = (int(i) for i in bad.nonzero()[0])
            raise LongSeqConfigError(
                f"duo pattern {self.source}: gate values must be in [0, 1]; layer {layer}, KV head {head} has "
                f"{g[layer, head].item()!r}")
        self.gates = g.contiguous()
        self.sink_size = check_size(self.sink_size, "sink_size", self.source)
        self.recent_size = check_size(self.recent_size, "recent_size", self.source)
        self.meta = dict(self.meta)

    @property
    def num_layers(self) -> int:
        return self.gates.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.gates.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_layers, self.num_kv_heads)

    def validate(self, num_layers: int, num_kv_heads: int) -> None:
        """Raise :class:`LongSeqConfigError` unless the pattern covers a model of this shape (total KV heads)."""
        check_shape(self.source, self.shape, (num_layers, num_kv_heads))



def check_shape(source: str, have: tuple[int, int], want: tuple[int, int]) -> None:
    if tuple(have) != tuple(want):
        raise LongSeqConfigError(
            f"duo pattern {source} has {have[0]} layers x {have[1]} KV heads, the model has {want[0]} x {want[1]}; "
            "use a pattern calibrated for this model")


def builtin_pattern_names() -> list[str]:
    """Names of the built-in patterns (sub-folders of :data:`BUILTIN_PATTERN_DIR` holding a gates file)."""
    try:
        entries = os.listdir(BUILTIN_PATTERN_DIR)
    except OSError:
        return []
    return sorted(e for e in entries if os.path.isfile(os.path.join(BUILTIN_PATTERN_DIR, e, GATES_FILE)))


def resolve_duo_pattern(path: str | os.PathLike) -> str:
    """The folder of a pattern given as a folder path or a built-in name.

    A plain name (no path separator) that is a built-in pattern wins over a folder of the same name in the
    working directory (write ``./name`` for that folder); anything else must be an existing folder.
    """
    p = os.fspath(path)
    is_name = p and os.sep not in p and (os.altsep is None or os.altsep not in p) and p not in (".", "..")
    if is_name and p in builtin_pattern_names():
        return os.path.join(BUILTIN_PATTERN_DIR, p)
    if os.path.isdir(p):
        return p
    names = builtin_pattern_names()
    raise LongSeqConfigError(
        f"duo pattern {p!r} is neither a folder nor a built-in pattern name; built-in patterns: "
        f"{', '.join(names) if names else '(none installed)'}; a pattern folder holds {GATES_FILE} and {CONFIG_FILE}")


def _parse_gates(text: str, source: str) -> torch.Tensor:
    """Gates of a ``full_attention_heads.tsv`` text; blank lines and ``#`` comments are skipped (as numpy does)."""
    rows: list[list[float]] = []
    first_line = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        row = []
        for col, cell in enumerate(line.split("\t"), start=1):
            try:
                row.append(float(cell.strip()))
            except ValueError:
                raise LongSeqConfigError(
                    f"duo pattern {source}: {GATES_FILE} line {lineno}, column {col}: {cell!r} is not a number "
                    "(cells are tab-separated gate values)") from None
        if rows and len(row) != len(rows[0]):
            raise LongSeqConfigError(
                f"duo pattern {source}: {GATES_FILE} is ragged: line {lineno} has {len(row)} values, line "
                f"{first_line} has {len(rows[0])} (one row per layer, one column per KV head)")
        if not rows:
            first_line = lineno
        rows.append(row)
    if not rows:
        raise LongSeqConfigError(f"duo pattern {source}: {GATES_FILE} holds no gate values")
    return torch.tensor(rows, dtype=torch.float64, device="cpu")


def load_duo_pattern(path: str | os.PathLike) -> DuoPattern:
    """Load a pattern folder (authors' format) or a built-in pattern by name.

    Raises :class:`LongSeqConfigError` naming the pattern for: an unknown folder/name (listing the built-in
    names), a missing file, unreadable JSON, missing/non-integer/non-positive ``sink_size``/``recent_size``,
    non-numeric cells, ragged rows, gates outside [0, 1].
    """
    folder = resolve_duo_pattern(path)
    source = os.fspath(path)
    if folder != source:  # a built-in name
        source = f"{source!r} (built-in, {folder})"
    for name in (GATES_FILE, CONFIG_FILE):
        if not os.path.isfile(os.path.join(folder, name)):
            raise LongSeqConfigError(f"duo pattern {source}: missing {name}; a pattern folder holds {GATES_FILE} "
                                     f"(gates, one row per layer) and {CONFIG_FILE} (sink_size, recent_size)")
    try:
        with open(os.path.join(folder, CONFIG_FILE)) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LongSeqConfigError(f"duo pattern {source}: {CONFIG_FILE} cannot be read as JSON: {e}") from e
    if not isinstance(config, dict):
        raise LongSeqConfigError(f"duo pattern {source}: {CONFIG_FILE} must hold a JSON object")
    for key in ("sink_size", "recent_size"):
        if key not in config:
            raise LongSeqConfigError(f"duo pattern {source}: {CONFIG_FILE} has no {key!r} (needs sink_size and "
                                     "recent_size, positive integers)")
    try:
        with open(os.path.join(folder, GATES_FILE)) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise LongSeqConfigError(f"duo pattern {source}: {GATES_FILE} cannot be read: {e}") from e
    gates = _parse_gates(text, source)
    meta = {k: v for k, v in config.items() if k not in ("sink_size", "recent_size")}
    return DuoPattern(gates, config["sink_size"], config["recent_size"], meta, source)


def save_duo_pattern(pattern: DuoPattern, path: str | os.PathLike) -> None:
    """Write ``pattern`` as a folder in the authors' format (created if missing; the two files are replaced).

    Gates are written as ``%.18e`` (as ``numpy.savetxt`` does), so float64 values round-trip exactly.
    """
    folder = os.fspath(path)
    os.makedirs(folder, exist_ok=True)
    lines = ["\t".join(f"{v:.18e}" for v in row) for row in pattern.gates.tolist()]
    with open(os.path.join(folder, GATES_FILE), "w") as f:
        f.write("\n".join(lines) + "\n")
    config = {**pattern.meta, "sink_size": pattern.sink_size, "recent_size": pattern.recent_size}
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=1)
        f.write("\n")


def random_pattern(num_layers: int, num_kv_heads: int, seed: int, sink_size: int = DEFAULT_SINK_SIZE,
                   recent_size: int = DEFAULT_RECENT_SIZE) -> DuoPattern:
    """Uniform random gates in [0, 1) (the "random heads at the same sparsity" control; shape-only benchmarks).

    Deterministic for a given ``seed`` on every machine (CPU generator). Built at engine start while vLLM has
    set torch's default device to the GPU, so every tensor here names its device.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    gates = torch.rand((num_layers, num_kv_heads), generator=gen, dtype=torch.float64, device="cpu")
    return DuoPattern(gates, sink_size, recent_size, {"random": True, "seed": int(seed)}, f"random(seed={seed})")


RANDOM_PATTERN = "random"


def random_pattern_seed(name: str | None) -> int | None:
    """The seed of a ``random`` / ``random:<seed>`` pattern name, ``None`` for any other name."""
    if not name or name.split(":", 1)[0] != RANDOM_PATTERN:
        return None
    _, _, seed = name.partition(":")
    try:
        return int(seed) if seed else 0
    except ValueError:
        raise LongSeqConfigError(f"LONGSEQ_DUO_PATTERN={name!r}: the seed of a random pattern must be an integer "
                                 "(random or random:<seed>)") from None
