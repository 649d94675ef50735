"""KDA Triton kernels (longseq.kernels.kda: gate, recurrent decode) vs the naive recurrence (fp64) and, on the GPU,
vs fla 0.6.0.

Without CUDA the kernels run in Triton's interpreter at tiny shapes (T <= 70 with a ragged last chunk, H=2,
K=16, V=32): TRITON_INTERPRET=1 is set while the kernel modules are imported (``triton.jit`` decides at
decoration time) and while this module's tests run, and restored after (as tests/kernels/test_sparse_decode_kernels.py
does). CPU inputs are fp32: the interpreter's bf16 ``tl.dot`` is wrong (Triton 3.9 reads the raw bits), so
the bf16 path is covered by the ``gpu``-marked tests, which run Kimi-Linear-48B's shapes (H=32, K=V=128, bf16)
natively, against the naive reference and against fla 0.6.0.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from triton_interp import CUDA, import_kernels, interpreter_env  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
_MODULES = ("utils", "naive", "gate", "fused_recurrent")

# The kda package with its kernels interpreted when there is no GPU (dependency order: later modules call the
# earlier ones' jit helpers), then the package itself so its re-exports point at the interpreted functions.
kda = import_kernels(*(f"longseq.kernels.kda.{m}" for m in _MODULES), "longseq.kernels.kda")[-1]
# numpy (the interpreter) warns on exp overflow inside sigmoid(-large) = 1 / (1 + inf) = 0, which is the right value
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
from longseq.kernels.kda.naive import l2norm, naive_kda_gate, naive_recurrent_kda  # noqa: E402

_interpreter_env = pytest.fixture(autouse=True, scope="module")(interpreter_env)


# --------------------------------------------------------------------------------------------- helpers
def make_inputs(T, H, K, V, n_states, seed, dtype=torch.float32, device=DEV, raw_scale=1.0):
    """Random (never zero) raw q/k/v, raw gate projection, gate params, raw beta and fp32 states [N, H, V, K]."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device)

    return dict(q=r(1, T, H, K).to(dtype), k=r(1, T, H, K).to(dtype), v=r(1, T, H, V).to(dtype),
                raw_g=r(1, T, H, K, s=raw_scale), A_log=(torch.rand(H, generator=g) * 2.0).to(device),
                dt_bias=r(H * K), raw_beta=r(1, T, H), h0=r(n_states, H, V, K, s=0.5))


def reference(x, cu_seqlens, lower_bound=None, l2=True):
    """fp64 naive recurrence per sequence; returns (o [1, T, H, V] fp64, final states [N, H, V, K] fp64)."""
    gate = naive_kda_gate(x["raw_g"].double(), x["A_log"].double(), x["dt_bias"].double(), lower_bound)
    q, k = x["q"].double(), x["k"].double()
    if l2:
        q, k = l2norm(q), l2norm(k)
    beta = torch.sigmoid(x["raw_beta"].double())
    outs, states = [], []
    for n in range(len(cu_seqlens) - 1):
        s, e = cu_seqlens[n], cu_seqlens[n + 1]
        o, st = naive_recurrent_kda(q[:, s:e], k[:, s:e], x["v"][:, s:e].double(), gate[:, s:e], beta[:, s:e],
                                    initial_state=x["h0"][n:n + 1].double().transpose(-1, -2),
                                    output_final_state=True)
        outs.append(o)
        states.append(st.transpose(-1, -2))
    return torch.cat(outs, 1), torch.cat(states, 0)


def assert_close(got, want, tol, what):
    err = (got.double() - want.double()).abs().max().item()
    scale = want.abs().max().item()
    assert scale > 1e-3, f"{what}: reference is ~0 ({scale}), the comparison would prove nothing"
    assert err <= tol * max(1.0, scale), f"{what}: max abs diff {err:.3g} (reference max {scale:.3g}, tol {tol})"


# --------------------------------------------------------------------------------------------- CPU tests
@pytest.mark.parametrize("lower_bound", [None, -5.0])
def test_gate_and_chunk_cumsum_match_naive(lower_bound):
    x = make_inputs(70, 2, 16, 16, 1, seed=1, raw_scale=3.0)
    raw = x["raw_g"]
    raw[0, :8, 0, :] = 60.0  # saturates: softplus takes its linear branch; the bounded gate reaches -5
    want = naive_kda_gate(raw.double(), x["A_log"].double(), x["dt_bias"].double(), lower_bound)
    got = kda.fused_kda_gate(raw.flatten(-2), x["A_log"], 16, g_bias=x["dt_bias"], lower_bound=lower_bound)
    assert got.shape == (1, 70, 2, 16) and got.dtype == torch.float32
    assert_close(got, want, 1e-5, "fused_kda_gate")
    if lower_bound is not None:
        assert torch.allclose(got[0, :8, 0].double(), torch.full((8, 16), -5.0, dtype=torch.float64), atol=1e-5)
        assert (got >= lower_bound - 1e-6).all() and (got < 0).all()
    cu = torch.tensor([0, 23, 70], dtype=torch.int32, device=DEV)
    gc = kda.kda_gate_chunk_cumsum(raw, x["A_log"], x["dt_bias"], lower_bound, cu_seqlens=cu)
    assert_close(gc, torch.cat([want[:, :23].cumsum(1), want[:, 23:].cumsum(1)], 1), 1e-5, "gate cumsum, varlen")
    gc = kda.kda_gate_chunk_cumsum(raw, x["A_log"], x["dt_bias"], lower_bound)  # one sequence: chunks of 64
    assert_close(gc, torch.cat([want[:, :64].cumsum(1), want[:, 64:].cumsum(1)], 1), 1e-5, "gate cumsum")


@pytest.mark.parametrize("first_valid_slot,pad", [(1, 0), (0, -1)])
def test_decode_batch_state_indices_and_padding(first_valid_slot, pad):
    """One launch for a batch of sequences at scattered pool slots; the padded entry is skipped."""
    B, H, K, V = 4, 2, 16, 32
    x = make_inputs(B, H, K, V, B, seed=4)
    slots = torch.tensor([3, pad, 1, 5], device=DEV)
    pool = torch.randn(6, H, V, K, device=DEV)
    for i, s in enumerate(slots.tolist()):
        if s >= first_valid_slot:
            pool[s] = x["h0"][i]
    before = pool.clone()
    # packed post-conv rows [q | k | v | extra], as vLLM 0.32's packed decode reads them
    mixed = torch.cat([x["q"][0].flatten(1), x["k"][0].flatten(1), x["v"][0].flatten(1),
                       torch.randn(B, 7, device=DEV)], 1)
    for lower_bound in (None, -5.0):
        pool_a = before.clone()
        out, ret = kda.fused_recurrent_kda_packed_decode(mixed, x["raw_g"], x["raw_beta"], x["A_log"], x["dt_bias"],
                                                         lower_bound, pool_a, slots, first_valid_slot=first_valid_slot)
        assert ret is pool_a and out.shape == (1, B, H, V)
        # the same through the unpacked entry (tokens as sequences of length 1)
        pool_b = before.clone()
        out_b, _ = kda.fused_recurrent_kda(x["q"].transpose(0, 1), x["k"].transpose(0, 1), x["v"].transpose(0, 1),
                                           x["raw_g"].transpose(0, 1), x["raw_beta"].transpose(0, 1),
                                           initial_state=pool_b, ssm_state_indices=slots, A_log=x["A_log"],
                                           dt_bias=x["dt_bias"], lower_bound=lower_bound, use_gate_in_kernel=True,
                                           use_beta_sigmoid_in_kernel=True, first_valid_slot=first_valid_slot)
        want_o, want_s = reference({**x, "h0": x["h0"]}, list(range(B + 1)), lower_bound)
        for i, s in enumerate(slots.tolist()):
            if s < first_valid_slot:
                assert (out[0, i] == 0).all() and (out_b[i] == 0).all()
                continue
            assert_close(out[0, i], want_o[0, i], 2e-5, f"packed decode output of sequence {i}")
            assert_close(out_b[i, 0], want_o[0, i], 2e-5, f"decode output of sequence {i}")
            assert_close(pool_a[s], want_s[i], 2e-5, f"packed decode state of sequence {i}")
            assert_close(pool_b[s], want_s[i], 2e-5, f"decode state of sequence {i}")
        untouched = [s for s in range(6) if s not in slots.tolist() or s < first_valid_slot]
        assert torch.equal(pool_a[untouched], before[untouched]) and torch.equal(pool_b[untouched], before[untouched])


def test_unsupported_shapes_and_arguments_are_refused():
    x = make_inputs(8, 1, 16, 16, 1, seed=5)
    beta = torch.sigmoid(x["raw_beta"])
    with pytest.raises(NotImplementedError, match="head dims"):
        big = torch.randn(1, 8, 1, 512, device=DEV)
        kda.fused_recurrent_kda(big, big, big, -big.abs(), beta)
    with pytest.raises(ValueError, match="float32"):
        kda.fused_recurrent_kda(x["q"], x["k"], x["v"], -x["raw_g"].abs(), beta, initial_state=x["h0"].half())
    with pytest.raises(ValueError, match="V-first"):
        kda.fused_recurrent_kda(x["q"], x["k"], torch.randn(1, 8, 1, 32, device=DEV), -x["raw_g"].abs(), beta,
                                initial_state=torch.zeros(1, 1, 16, 32, device=DEV))
    with pytest.raises(NotImplementedError, match="num_accepted_tokens"):
        kda.fused_recurrent_kda(x["q"], x["k"], x["v"], -x["raw_g"].abs(), beta, initial_state=x["h0"],
                                num_accepted_tokens=torch.ones(1, dtype=torch.int32))
    with pytest.raises(NotImplementedError, match="cp_context"):
        kda.fused_recurrent_kda(x["q"], x["k"], x["v"], -x["raw_g"].abs(), beta, cp_context=object())


# --------------------------------------------------------------------------------------------- GPU tests
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("lower_bound", [None, -5.0])
def test_gpu_full_shapes_vs_naive(lower_bound):
    """Kimi-Linear-48B head shapes, bf16 inputs, fp32 naive reference."""
    x = make_inputs(2048, 32, 128, 128, 3, seed=6, dtype=torch.bfloat16)
    if lower_bound is not None:
        x["raw_g"][0, :, 5, :16] = 60.0  # gate pinned at the lower bound
    pool = x["h0"].clone()
    B = 3
    od, _ = kda.fused_recurrent_kda(x["q"][:, :B].transpose(0, 1), x["k"][:, :B].transpose(0, 1),
                                    x["v"][:, :B].transpose(0, 1), x["raw_g"][:, :B].transpose(0, 1),
                                    x["raw_beta"][:, :B].transpose(0, 1), initial_state=pool,
                                    ssm_state_indices=torch.tensor([1, 2, 0], device=DEV), A_log=x["A_log"],
                                    dt_bias=x["dt_bias"], lower_bound=lower_bound, use_gate_in_kernel=True,
                                    use_beta_sigmoid_in_kernel=True, first_valid_slot=0)
    wo, ws = reference({**x, "h0": x["h0"][[1, 2, 0]]}, [0, 1, 2, 3], lower_bound)
    assert_close(od[:, 0], wo[0], 3e-2, "decode bf16 output")
    assert_close(pool[[1, 2, 0]], ws, 1e-3, "decode state")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_matches_fla():
    """Same inputs through fla 0.6.0's fused_recurrent_kda (Triton path, V-first state)."""
    os.environ.setdefault("FLA_FLASH_KDA", "0")
    try:
        from fla.ops.kda import fused_recurrent_kda as fla_recurrent
    except ImportError as e:
        pytest.skip(f"fla (fla-core 0.6.0) is not importable here: {e}")
    x = make_inputs(4096, 32, 128, 128, 2, seed=7, dtype=torch.bfloat16)
    gate = kda.fused_kda_gate(x["raw_g"].flatten(-2), x["A_log"], 128, g_bias=x["dt_bias"])
    beta = torch.sigmoid(x["raw_beta"])
    B = 16
    args = [t[:, :B].transpose(0, 1).contiguous() for t in (x["q"], x["k"], x["v"], gate, beta)]
    pool = torch.randn(B + 1, 32, 128, 128, device=DEV)
    idx = torch.arange(1, B + 1, device=DEV)
    ours_pool, fla_pool = pool.clone(), pool.clone()
    od, _ = kda.fused_recurrent_kda(*args, initial_state=ours_pool, ssm_state_indices=idx)
    fod, fst = fla_recurrent(*args, initial_state=fla_pool[1:].clone(), output_final_state=True,
                             use_qk_l2norm_in_kernel=True, state_v_first=True)
    assert_close(od, fod, 3e-2, "fused_recurrent_kda vs fla")
    assert_close(ours_pool[1:], fst, 1e-3, "decode state vs fla")
