"""``benchmarks.sglang_common.kernel_table``: GPU kernel time per step from a torch profiler chrome trace, as
``bench_sglang_decode --profile-steps`` reads the trace SGLang's profiler writes (the GPU run itself needs SGLang on
a GPU; this checks the reading on a trace written here)."""

from __future__ import annotations

import gzip
import json
import os
import random
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:  # benchmarks/ is not installed: import it from the checkout
    sys.path.insert(0, REPO)
from benchmarks.sglang_common import kernel_table  # noqa: E402


def _trace(path, events):
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events, "deviceProperties": []}, f)


def test_kernel_time_per_step_by_name_from_a_gzipped_chrome_trace(tmp_path):
    rng = random.Random(3)
    steps = 4
    durations = {"flash_fwd_kernel": [rng.uniform(50, 90) for _ in range(steps * 30)],
                 "select_topk_pages": [rng.uniform(5, 20) for _ in range(steps * 30)],
                 "gemm_bf16": [rng.uniform(100, 300) for _ in range(steps * 7)]}
    events = [{"ph": "X", "cat": "kernel", "name": name, "dur": d, "ts": i}
              for name, ds in durations.items() for i, d in enumerate(ds)]
    events += [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "dur": 1e6, "ts": 0},  # host ops: not kernels
               {"ph": "i", "cat": "kernel", "name": "marker", "ts": 0},  # an instant event has no duration
               {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "dur": 1e5, "ts": 0}]
    path = tmp_path / "prof-TP-0.trace.json.gz"
    _trace(path, events)
    table = kernel_table(str(path), steps, top=2)
    want = {k: sum(v) / steps for k, v in durations.items()}
    assert table[0]["total_us_per_step"] == pytest.approx(sum(want.values()), abs=0.2)
    assert [r["kernel"] for r in table[1:]] == sorted(want, key=want.get, reverse=True)[:2]  # busiest first, top 2
    for r in table[1:]:
        assert r["us_per_step"] == pytest.approx(want[r["kernel"]], abs=0.01)
        assert r["calls_per_step"] == len(durations[r["kernel"]]) / steps


def test_plain_json_trace_and_a_truncated_one(tmp_path):
    path = tmp_path / "t.trace.json"
    path.write_text(json.dumps({"traceEvents": [{"ph": "X", "cat": "kernel", "name": "k", "dur": 8.0}]}))
    assert kernel_table(str(path), 2)[1] == {"kernel": "k", "us_per_step": 4.0, "calls_per_step": 0.5}
    path.write_text('{"traceEvents": [{"ph": "X"')  # still being written: the caller polls again
    with pytest.raises(ValueError):
        kernel_table(str(path), 2)
