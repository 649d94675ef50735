"""SGLang attention test kit helpers, shared by the tests and run as a script in a fresh interpreter.

``python sglang_kit.py`` proves the whole path from a clean process: the ``sglang.srt.plugins`` entry
point registers ``longseq_dense`` (lazily: the backend module is not imported yet), then every dense case
of SGLang's kit runs through our backend on CPU. It prints one ``LONGSEQ_PROBE {json}`` line.
"""

from __future__ import annotations

import json
import os
import sys
import unittest

BACKEND = "longseq_dense"


def kit_cases(backend: str = BACKEND) -> tuple:
    """All dense cases of ``sglang.test.kits.attention_unittest`` (MHA/GQA/MQA extend+decode, SWA extend)."""
    from sglang.test.kits.attention_unittest.attention_methods import dense_attention as da

    return (da.make_dense_cases(backend) + da.make_swa_no_prefix_input_config_cases(backend)
            + da.make_swa_prefix_input_config_cases(backend))


class NoSkipCase(unittest.TestCase):
    """The kit calls ``testcase.skipTest`` when a backend factory fails: make that a failure instead."""

    def skipTest(self, reason):  # noqa: N802 - unittest's name
        raise AssertionError(f"the attention kit could not build the backend: {reason}")


#: float32 on CPU matches the SDPA reference far tighter than the kit's float16 tolerance (3e-2), which
#: would let a 1% error through; the tight check makes the test sensitive to a wrong wrapper.
FP32_TOL = 1e-5


def run_case(case):
    """Run one kit case on CPU in float32 against the kit's SDPA reference; returns the backend used.

    Same steps as the kit's ``run_dense_attention_case``, plus a float32-tight comparison.
    """
    import torch
    from sglang.test.kits.attention_unittest.attention_methods import dense_attention as da

    with torch.no_grad():  # the kit's fixture writes into leaf tensors that require grad otherwise
        fixture = da.build_dense_attention_fixture(NoSkipCase(), case, device="cpu", dtype=torch.float32)
        actual = da.run_dense_fixture_eager(fixture)
        expected = da.expected_dense_fixture_output(fixture)
    torch.testing.assert_close(actual, expected, atol=da.DENSE_ATOL, rtol=da.DENSE_RTOL)
    torch.testing.assert_close(actual, expected, atol=FP32_TOL, rtol=FP32_TOL)
    return fixture.backend


def main() -> None:
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.plugins import load_plugins

    out = {"pid": os.getpid(), "before": BACKEND in ATTENTION_BACKENDS or BACKEND in ATTENTION_BACKEND_CHOICES}
    load_plugins()
    factory = ATTENTION_BACKENDS.get(BACKEND)
    out.update(
        factory=f"{factory.__module__}.{factory.__qualname__}" if factory else None,
        choice_count=ATTENTION_BACKEND_CHOICES.count(BACKEND),
        dense_imported_at_registration="longseq.attention_backends.sglang.dense" in sys.modules,
    )
    cases, failures = kit_cases(), {}
    for case in cases:
        try:
            run_case(case)
        except Exception as e:  # noqa: BLE001 - reported to the test
            failures[case.name] = repr(e)[:500]
    from longseq.attention_backends.sglang.dense import TRACE

    out.update(cases=len(cases), failures=failures, counts=TRACE.counts)
    print("LONGSEQ_PROBE " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
