"""vLLM's attention API read from source with ``ast`` (the readers and checks are ``wheel_api``'s): nothing is
installed, nothing of vLLM is imported. The vLLM wheels are ``abi3`` manylinux_2_28 builds."""

from __future__ import annotations

import wheel_api
from wheel_api import (  # noqa: F401 - the vLLM conformance test's names
    REPO, ApiIndex, ClassInfo, Method, Param, call_problems, call_shape, dir_reader, find_calls, function_node,
    override_problems, params_of, wheel_cache_dir, wheel_reader,
)


def download_wheel(version: str) -> str:
    """Path of the ``vllm==version`` manylinux x86_64 wheel, fetched on first use and cached."""
    return wheel_api.download_wheel("vllm", version, platform="manylinux_2_28_x86_64")


def installed_vllm_dir() -> str | None:
    """Folder of the installed ``vllm`` package, located without importing it."""
    return wheel_api.installed_package_dir("vllm")
