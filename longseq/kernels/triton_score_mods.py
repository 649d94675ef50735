"""Triton helpers for the score modifiers of ``score_mods.py`` (soft-cap, learned sinks), shared by the kernels."""

import triton
import triton.language as tl


@triton.jit
def capped_scores(qk, qk_scale, cap_log2, SOFTCAP: tl.constexpr):
    """Raw ``q.k`` products -> scores in log2 units (see ``score_mods.kernel_args``)."""
    if SOFTCAP:
        x = qk * qk_scale
        # tanh(x) = 1 - 2 / (e^(2x) + 1): right at both tails (e^(2x) = inf gives 1, 0 gives -1), no libdevice
        return cap_log2 * (1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0))
    else:
        return qk * qk_scale


@triton.jit
def sink_factor(lse2, sink2):
    """``1 / (1 + 2^(sink2 - lse2))``: the share of the real keys when a sink (log2 units) joins the softmax;
    0 for a row with no key (``lse2 = -inf``)."""
    return 1.0 / (1.0 + tl.exp2(sink2 - lse2))
