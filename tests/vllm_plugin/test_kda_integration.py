"""KDA integration with vLLM (``LONGSEQ_KDA``): the knobs, the out-of-tree layer registration, start-up errors,
and both versions' ``_forward`` bodies (vLLM 0.26's split q/k/v, 0.32+'s packed): decode steps through our kernels
(Triton interpreter on CPU), steps with prefills routed to vLLM's own ``_forward`` (a PyTorch stand-in here),
against the naive KDA reference on random inputs.

vLLM's causal-conv ops and forward context are Triton/engine-bound, so the forward tests give the adapter PyTorch
convolutions and a stand-in context; everything else (metadata slicing, routing, the kernel calls on the state
pool, the output placement) is the adapter's own code. The state pools are strided views of raw pages, as
vLLM's KV cache hands them to the layer, and vLLM 0.26's own decode branch is re-implemented (naive kernels for its
Triton ones) to check our decode step against it on the same pages and indices.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from longseq.config import LongSeqConfig, LongSeqConfigError
from longseq.plugin.vllm import (
    VLLM_KDA_LAYER_CLASS,
    VLLM_KDA_LAYER_MODULE,
    _AfterImportHook,
    install_vllm_kda_layer,
    register_vllm_kda_layer,
)
from longseq.versions import LongSeqVersionError, vllm_kda_layer_api

triton = pytest.importorskip("triton")
from triton_interp import import_kernels, interpreter_env  # noqa: E402

LAYER = VLLM_KDA_LAYER_CLASS


# Every kernel module twice: the 2nd pass rebinds names a module imported from one not yet re-imported.
_KDA_MODULES = [f"longseq.kernels.kda.{m.name}" for m in pkgutil.iter_modules(
    importlib.import_module("longseq.kernels.kda").__path__)]
kk = import_kernels(*_KDA_MODULES, *_KDA_MODULES, "longseq.kernels.kda")[-1]
from longseq.kernels.kda.naive import l2norm  # noqa: E402

_interpreter = pytest.fixture(autouse=True, scope="module")(interpreter_env)


@pytest.fixture
def kda_env(monkeypatch):
    """Run ``longseq.plugin.vllm.register`` with a given ``LONGSEQ_KDA``, restoring vLLM's registries after."""
    from vllm.model_executor.custom_op import op_registry_oot

    import longseq.config as cfg_mod
    import longseq.plugin.vllm as plugin

    saved_oot = op_registry_oot.get(LAYER)
    saved_hooks = list(sys.meta_path)
    monkeypatch.setattr(plugin, "_registered", set())
    monkeypatch.setattr(cfg_mod, "_CACHED", None)

    def run(value: str | None):
        if value is None:
            monkeypatch.delenv("LONGSEQ_KDA", raising=False)
        else:
            monkeypatch.setenv("LONGSEQ_KDA", value)
        cfg_mod._CACHED = None
        plugin.register()

    yield run
    sys.meta_path[:] = saved_hooks
    op_registry_oot.pop(LAYER, None)
    if saved_oot is not None:
        op_registry_oot[LAYER] = saved_oot


# ------------------------------------------------------------------------------------------------ knob
def test_kda_knob_values():
    assert LongSeqConfig.from_env({}).kda is False
    assert LongSeqConfig.from_env({"LONGSEQ_KDA": "1"}).kda is True
    assert LongSeqConfig.from_env({"LONGSEQ_KDA": "0"}).kda is False
    with pytest.raises(LongSeqConfigError, match="LONGSEQ_KDA='2' must be a boolean"):
        LongSeqConfig.from_env({"LONGSEQ_KDA": "2"})


# -------------------------------------------------------------------------------------------- registry
def test_kda_off_leaves_vllm_layer_untouched(kda_env):
    from vllm.model_executor.custom_op import op_registry_oot

    kda_env(None)
    kda_env("0")
    assert LAYER not in op_registry_oot
    assert not any(isinstance(f, _AfterImportHook) for f in sys.meta_path)


def test_kda_on_registers_our_layer_idempotently(kda_env):
    from vllm.model_executor.custom_op import op_registry_oot

    layer_mod = importlib.import_module(VLLM_KDA_LAYER_MODULE)
    from longseq.attention_backends.vllm.kda import LongSeqKimiDeltaAttention, forward_packed_qkv, forward_split_qkv

    kda_env("1")
    kda_env("1")  # a second register() (vLLM calls it in every process, sometimes twice) changes nothing
    register_vllm_kda_layer()
    assert op_registry_oot[LAYER] is LongSeqKimiDeltaAttention
    base = getattr(layer_mod, LAYER)
    assert issubclass(LongSeqKimiDeltaAttention, base)
    # What the model's `KimiGatedDeltaNetAttention(...)` builds (PluggableLayer.__new__; __init__ not run here).
    assert type(base.__new__(base)) is LongSeqKimiDeltaAttention
    want = "split_qkv" if "q_proj_states" in inspect.signature(base._forward).parameters else "packed_qkv"
    assert vllm_kda_layer_api(base) == want
    body = forward_split_qkv if want == "split_qkv" else forward_packed_qkv
    assert inspect.unwrap(LongSeqKimiDeltaAttention._forward) is body


def test_registration_defers_until_the_layer_module_is_imported(monkeypatch, tmp_path):
    """Without vLLM's layer module loaded, register() only installs an import hook (no heavy import); the hook
    fires once, right after the module it waits for executes."""
    monkeypatch.delitem(sys.modules, VLLM_KDA_LAYER_MODULE, raising=False)
    saved = list(sys.meta_path)
    try:
        assert register_vllm_kda_layer() == "deferred"
        assert register_vllm_kda_layer() == "deferred"
        hooks = [f for f in sys.meta_path if isinstance(f, _AfterImportHook)]
        assert [h.name for h in hooks] == [VLLM_KDA_LAYER_MODULE]
    finally:
        sys.meta_path[:] = saved
    (tmp_path / "kda_hook_probe.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    sys.meta_path.insert(0, _AfterImportHook("kda_hook_probe", lambda m: seen.append(m.VALUE)))
    try:
        import kda_hook_probe  # noqa: F401

        assert seen == [42]
        assert not any(isinstance(f, _AfterImportHook) for f in sys.meta_path)
        assert inspect.getsource(kda_hook_probe).strip() == "VALUE = 42"  # loader delegation (tracebacks)
    finally:
        sys.modules.pop("kda_hook_probe", None)
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AfterImportHook)]


def test_conflicting_replacement_and_unknown_layout_are_clear_errors(kda_env):
    from vllm.model_executor.custom_op import op_registry_oot

    layer_mod = importlib.import_module(VLLM_KDA_LAYER_MODULE)
    kda_env(None)  # only to get the registry restored after the test
    op_registry_oot[LAYER] = type("OtherPluginKDA", (getattr(layer_mod, LAYER),), {})
    with pytest.raises(LongSeqVersionError, match="already replaced by .*OtherPluginKDA"):
        install_vllm_kda_layer(layer_mod)

    class FutureLayer:
        def _forward(self, hidden_states, core_attn_out):
            pass

    with pytest.raises(LongSeqVersionError, match=r"FutureLayer._forward\('hidden_states', 'core_attn_out'\)"):
        vllm_kda_layer_api(FutureLayer)


def test_unsupported_layer_shapes_fail_at_construction():
    from longseq.attention_backends.vllm.kda import check_kda_layer_supported

    check_kda_layer_supported(head_dim=128, state_dtype=torch.float32)
    with pytest.raises(LongSeqConfigError, match=rf"LONGSEQ_KDA=1.*head_dim.* is 512.*<= {kk.MAX_HEAD_DIM}"):
        check_kda_layer_supported(head_dim=512, state_dtype=torch.float32)
    with pytest.raises(LongSeqConfigError, match="recurrent state is torch.bfloat16 .*mamba_ssm_cache_dtype"):
        check_kda_layer_supported(head_dim=128, state_dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="speculative decoding .*num_speculative_tokens=2"):
        check_kda_layer_supported(head_dim=128, state_dtype=torch.float32, num_speculative_tokens=2)


# ------------------------------------------------------------------------------------ forward vs reference
H, D, W, SLOTS = 2, 32, 4, 8
C = H * D
PREFILL = {3: 5, 5: 3}  # pool slot -> prefill tokens; slot 3 continues a stored state, slot 5 starts fresh


def conv_fn(x, weight, bias, activation, conv_states, has_initial_state, cache_indices, query_start_loc, metadata):
    """PyTorch stand-in for vLLM's varlen ``causal_conv1d_fn``: x ``[C, T]``; conv_states ``[S, C, W-1]``."""
    out = torch.empty_like(x)
    for i, slot in enumerate(cache_indices.tolist()):
        s, e = query_start_loc[i].item(), query_start_loc[i + 1].item()
        prev = conv_states[slot] if has_initial_state[i] else x.new_zeros(x.shape[0], W - 1)
        win = torch.cat([prev, x[:, s:e]], dim=1)
        out[:, s:e] = F.silu(F.conv1d(win[None], weight[:, None], groups=x.shape[0])[0])
        conv_states[slot] = win[:, -(W - 1):]
    return out


def conv_update(x, conv_state, weight, bias, activation, conv_state_indices, validate_data, out=None):
    """PyTorch stand-in for vLLM's ``causal_conv1d_update``: one token per row of x ``[B, C]``."""
    out = torch.empty_like(x) if out is None else out
    for b, slot in enumerate(conv_state_indices.tolist()):
        win = torch.cat([conv_state[slot], x[b, :, None]], dim=1)
        out[b] = F.silu((win * weight).sum(-1))
        conv_state[slot] = win[:, 1:]
    return out


def paged_kda_cache(slots, gen):
    """A KDA layer's ``kv_cache`` as vLLM builds it (``gpu_model_runner``, ``MambaSpec``): one raw page per slot holding
    the conv state, then the recurrent state, then padding (pages are sized like the attention layers' pages); both
    states are ``torch.as_strided`` views whose slot stride is the page size, not their own row size.
    Returns ``(raw [slots * page], conv [slots, 3C, W-1], state [slots, H, V, K])`` with random contents."""
    conv_numel, state_numel = 3 * C * (W - 1), H * D * D
    page = conv_numel + state_numel + 40
    raw = torch.randn(slots * page, generator=gen)
    conv = torch.as_strided(raw, (slots, 3 * C, W - 1), (page, W - 1, 1), 0)
    state = torch.as_strided(raw, (slots, H, D, D), (page, D * D, D, 1), conv_numel)
    state.mul_(0.1)
    return raw, conv, state


def patch_vllm_ops(monkeypatch, layer, meta):
    """Our shims' vLLM ops (forward context with ``meta["m"]`` as the layer's metadata, PyTorch convolutions)."""
    from longseq.attention_backends.vllm import kda as adapter

    ctx = lambda: types.SimpleNamespace(attn_metadata={layer.prefix: meta["m"]})  # noqa: E731
    ops = types.SimpleNamespace(get_forward_context=ctx, causal_conv1d_update=conv_update,
                                is_conv_state_dim_first=lambda: True)
    monkeypatch.setattr(adapter, "_vllm_ops", lambda: ops)


def o_norm(x, gate):  # stand-in for FusedRMSNormGated (0.32+ applies it inside _forward)
    return x * torch.sigmoid(gate.float())


def ref_sequence(tokens_qkv, raw_g, beta, conv_w, conv0, state0, A_log, dt_bias, lower_bound):
    """Naive KDA over one sequence's whole history. tokens_qkv ``[L, 3C]``; returns (o ``[L, H, D]``, state VK)."""
    win = torch.cat([conv0, tokens_qkv.T], dim=1)
    x = F.silu(F.conv1d(win[None], conv_w[:, None], groups=3 * C)[0]).T
    q, k, v = (t.reshape(1, -1, H, D) for t in x.split(C, dim=-1))
    g = kk.naive_kda_gate(raw_g[None], A_log, dt_bias, lower_bound=lower_bound)
    o, s = kk.naive_recurrent_kda(l2norm(q), l2norm(k), v, g,
                                  beta[None], initial_state=state0.transpose(-1, -2)[None], output_final_state=True)
    return o[0], s[0].transpose(-1, -2)


def framework_prefill_stand_in(layer, api, m, args):
    """Stand-in for vLLM's own ``_forward`` on a step with prefills (its vendored Triton kernels do not run on CPU):
    the same math in PyTorch (conv stand-in, naive gate and recurrence per sequence), continuing and writing the
    pooled conv and recurrent states, the output written (and, in 0.32+, normed) as vLLM's does."""
    n = m.num_actual_tokens
    conv_pool, state_pool = layer.kv_cache
    if api == "split_qkv":
        q, k, v, raw_g, beta, out = args
        qkv = torch.cat([q[:n], k[:n], v[:n]], dim=-1)
    else:
        mixed, raw_g, g2, raw_beta, out = args
        qkv, beta = mixed[:n], raw_beta.float().sigmoid()
    weight = layer.conv1d.weight[:, 0]  # the three q/k/v convolutions are the 3C channels of one depthwise conv
    x = conv_fn(qkv.T, weight, None, "silu", conv_pool, m.has_initial_state, m.non_spec_state_indices_tensor,
                m.non_spec_query_start_loc, m).T
    q, k, v = (t.reshape(1, n, H, D) for t in x.split(C, dim=-1))
    g = kk.naive_kda_gate(raw_g[:, :n], layer.A_log, layer.dt_bias, lower_bound=layer.gate_lower_bound)
    cu = m.non_spec_query_start_loc.tolist()
    for i, slot in enumerate(m.non_spec_state_indices_tensor.tolist()):
        s, e = cu[i], cu[i + 1]
        state0 = state_pool[slot] if m.has_initial_state[i] else torch.zeros(H, D, D)
        o, final = kk.naive_recurrent_kda(l2norm(q[:, s:e]), l2norm(k[:, s:e]), v[:, s:e], g[:, s:e], beta[:, s:e],
                                          initial_state=state0.transpose(-1, -2)[None], output_final_state=True)
        state_pool[slot] = final[0].transpose(-1, -2)
        out[0, s:e] = o[0]
    if api == "packed_qkv":
        out.copy_(layer.o_norm(out, g2))


def _run_layer(api, lower_bound, monkeypatch):
    """Prefill two sequences, then one decode step each, through the version's _forward; compare to naive.

    The prefill step must go to the layer's ``longseq_framework_forward`` (vLLM's own ``_forward``) with _forward's
    own arguments; here that is :func:`framework_prefill_stand_in`, so the same reference checks hold after it. The
    decode step must run on our kernels."""
    from longseq.attention_backends.vllm.common import BackendTrace
    from longseq.attention_backends.vllm.kda import forward_packed_qkv, forward_split_qkv

    gen = torch.Generator().manual_seed(7)
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=gen) * scale  # noqa: E731
    conv_w = rnd(3 * C, W, scale=0.5)
    A_log, dt_bias = rnd(H, scale=0.5), rnd(C, scale=0.5)
    _, conv_pool, state_pool = paged_kda_cache(SLOTS, gen)  # strided views, as vLLM's KV cache gives them
    conv_before, state_before = conv_pool.clone(), state_pool.clone()
    total = {slot: n + 1 for slot, n in PREFILL.items()}
    seq = {slot: (rnd(n, 3 * C), rnd(n, H, D), rnd(n, H)) for slot, n in total.items()}  # qkv, raw gate, raw beta
    trace = BackendTrace("kda-test", LongSeqConfig())
    config = LongSeqConfig(kda=True)
    forward = forward_split_qkv if api == "split_qkv" else forward_packed_qkv
    framework_calls = []
    meta = {}

    def framework_forward(*args):  # stand-in for vLLM's _forward: the same math in PyTorch
        framework_calls.append(args)
        framework_prefill_stand_in(layer, api, meta["m"], args)

    layer = types.SimpleNamespace(longseq_framework_forward=framework_forward,
        prefix="model.layers.0.self_attn", head_dim=D, local_projection_size=C, A_log=A_log, dt_bias=dt_bias,
        gate_lower_bound=lower_bound, kv_cache=(conv_pool, state_pool), o_norm=o_norm,
        longseq_config=config, longseq_trace=trace,
        conv1d=types.SimpleNamespace(weight=conv_w[:, None], bias=None),
        **{f"{n}_conv1d": types.SimpleNamespace(weight=w[:, None], bias=None)
           for n, w in zip("qkv", conv_w.split(C))})
    patch_vllm_ops(monkeypatch, layer, meta)

    def step(parts, num_prefills):
        slots = list(parts)
        qkv = torch.cat([seq[s][0][a:b] for s, (a, b) in parts.items()])
        raw_g = torch.cat([seq[s][1][a:b] for s, (a, b) in parts.items()])[None]
        raw_beta = torch.cat([seq[s][2][a:b] for s, (a, b) in parts.items()])[None]
        lens = [b - a for a, b in parts.values()]
        meta["m"] = types.SimpleNamespace(
            num_actual_tokens=sum(lens), num_prefills=num_prefills, num_decodes=len(slots) - num_prefills,
            has_initial_state=torch.tensor([s == 3 for s in slots]), spec_sequence_masks=None,
            non_spec_query_start_loc=torch.tensor([0] + lens).cumsum(0).to(torch.int32),
            non_spec_state_indices_tensor=torch.tensor(slots, dtype=torch.int32))
        out = torch.zeros(1, sum(lens) + 2, H, D)  # + CUDA-graph-style padding rows that must stay untouched
        if api == "split_qkv":
            q, k, v = qkv.split(C, dim=-1)
            args = (q, k, v, raw_g, raw_beta.sigmoid(), out)
        else:
            proj = torch.cat([qkv, raw_beta[0], rnd(qkv.shape[0], D)], dim=-1)  # strided views, as vLLM passes
            mixed, beta_view, _ = proj.split([3 * C, H, D], dim=-1)
            args = (mixed, raw_g, torch.ones(out.shape[1], H, D), beta_view[None], out)
        calls_before = len(framework_calls)
        forward(layer, *args)
        routed_to_framework = len(framework_calls) > calls_before
        assert routed_to_framework == (num_prefills > 0)
        if routed_to_framework:  # the framework gets _forward's arguments untouched (it slices them itself)
            assert all(a is b for a, b in zip(framework_calls[-1], args, strict=True))
        assert out[0, sum(lens):].abs().max() == 0
        return out[0, :sum(lens)]

    o_prefill = step({s: (0, n) for s, n in PREFILL.items()}, num_prefills=2)
    o_decode = step({s: (n, n + 1) for s, n in PREFILL.items()}, num_prefills=0)
    norm = (lambda x: o_norm(x, torch.ones(()))) if api == "packed_qkv" else (lambda x: x)
    offset = 0
    for i, (slot, n) in enumerate(PREFILL.items()):
        qkv, raw_g, raw_beta = seq[slot]
        fresh = slot != 3
        o_ref, s_ref = ref_sequence(qkv, raw_g, raw_beta.sigmoid(), conv_w,
                                    torch.zeros(3 * C, W - 1) if fresh else conv_before[slot],
                                    torch.zeros(H, D, D) if fresh else state_before[slot], A_log, dt_bias, lower_bound)
        torch.testing.assert_close(o_prefill[offset:offset + n], norm(o_ref[:n]), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(o_decode[i], norm(o_ref[n]), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(state_pool[slot], s_ref, atol=2e-3, rtol=2e-3)
        offset += n
    others = [s for s in range(SLOTS) if s not in PREFILL]
    assert torch.equal(state_pool[others], state_before[others]) and torch.equal(conv_pool[others], conv_before[others])
    assert trace.counts["forward_calls"] == 1  # our kernels: the decode step
    assert trace.counts.get("framework_prefill_calls", 0) == 1


@pytest.mark.parametrize("api,lower_bound", [("split_qkv", None), ("packed_qkv", -3.0)])
def test_layer_forward_matches_naive_kda(api, lower_bound, monkeypatch):
    _run_layer(api, lower_bound, monkeypatch)


def test_kda_prefill_knob_values():
    assert LongSeqConfig.from_env({}).kda_prefill == "framework"
    assert LongSeqConfig.from_env({"LONGSEQ_KDA_PREFILL": "framework"}).kda_prefill == "framework"
    with pytest.raises(LongSeqConfigError, match="LONGSEQ_KDA_PREFILL='longseq': longseq's KDA chunk prefill kernel "
                                                  "was removed; prefill runs on the framework's own kernel"):
        LongSeqConfig.from_env({"LONGSEQ_KDA_PREFILL": "longseq"})
    with pytest.raises(LongSeqConfigError, match="LONGSEQ_KDA_PREFILL='fla' is not allowed; allowed values: "
                                                  "framework$"):
        LongSeqConfig.from_env({"LONGSEQ_KDA_PREFILL": "fla"})


def test_framework_prefill_under_skip_kv_write_leaves_states_unwritten():
    """The negative-control fault must also hold when the framework runs the prefill: its state write is undone."""
    from longseq.attention_backends.vllm.common import BackendTrace
    from longseq.attention_backends.vllm.kda import _framework_prefill

    state_pool = torch.randn(SLOTS, H, D, D)
    before = state_pool.clone()

    def framework_forward(*args):  # writes states, as vLLM's prefill does
        state_pool[3] += 1.0

    layer = types.SimpleNamespace(prefix="model.layers.0.self_attn", longseq_framework_forward=framework_forward,
                                  longseq_config=LongSeqConfig(kda=True, debug_fault="skip_kv_write"),
                                  longseq_trace=BackendTrace("kda-fault-test", LongSeqConfig()))
    _framework_prefill(layer, ("args",), state_pool)
    assert torch.equal(state_pool, before) and layer.longseq_trace.counts["framework_prefill_calls"] == 1


# ------------------------------------------------------------------------- vLLM 0.26's own decode, re-implemented
def vllm026_decode_forward(layer, m, q_proj_states, k_proj_states, v_proj_states, g1, beta, core_attn_out):
    """vLLM 0.26 ``KimiGatedDeltaNetAttention._forward``, decode branch (``num_prefills == 0``), line for line, with
    PyTorch stand-ins for its Triton kernels: ``conv_update`` for ``causal_conv1d_update``, ``naive_kda_gate`` for
    ``fused_kda_gate`` (``-exp(A_log) * softplus(g1 + dt_bias)``), and for its ``fused_recurrent_kda`` the naive
    recurrence per sequence as its kernel walks it: sequence i's tokens from ``cu_seqlens`` (cut to
    ``num_decodes + 1``), its slot ``ssm_state_indices[i]`` (``<= 0``, the null block or padding: skipped), the state
    row ``[H, V, K]`` read and rewritten in place at that slot of the pool, q/k L2-normalized, beta as given."""
    n = m.num_actual_tokens
    conv_state, recurrent_state = layer.kv_cache
    idx = m.non_spec_state_indices_tensor
    convs = (layer.q_conv1d, layer.k_conv1d, layer.v_conv1d)
    q, k, v = [conv_update(x[:n], s, c.weight.view(c.weight.size(0), c.weight.size(2)), c.bias, "silu", idx[:n], True)
               .reshape(1, n, H, D) for x, s, c in zip((q_proj_states, k_proj_states, v_proj_states),
                                                       conv_state.chunk(3, dim=-2), convs)]
    g = kk.naive_kda_gate(g1[:, :n], layer.A_log, layer.dt_bias)
    beta = beta[:, :n]
    o = torch.full_like(k, float("nan"))  # torch.empty_like(k) there: rows of skipped slots are never written
    cu = m.non_spec_query_start_loc[: m.num_decodes + 1].tolist()
    for i in range(m.num_decodes):
        slot, (s, e) = int(idx[i]), cu[i:i + 2]
        if slot <= 0:
            continue
        o[:, s:e], final = kk.naive_recurrent_kda(
            l2norm(q[:, s:e]), l2norm(k[:, s:e]), v[:, s:e], g[:, s:e], beta[:, s:e],
            initial_state=recurrent_state[slot].transpose(-1, -2)[None], output_final_state=True)
        recurrent_state[slot] = final[0].transpose(-1, -2)
    core_attn_out[0, :n] = o[0, :n]


def test_vllm026_decode_step_matches_vllm_own_decode_on_paged_cache(monkeypatch):
    """Our 0.26 decode (``forward_split_qkv``, decode-only step) vs vLLM 0.26's decode math on the same inputs, the
    same KV-cache pages (strided views with padding, as vLLM allocates them) and the same CUDA-graph-padded indices:
    same outputs for the real decodes, same bytes everywhere else in the pages (other slots, conv states, padding).
    Regression: the recurrent kernel addressed slots at ``H*V*K`` elements instead of the pool's slot stride, so on
    GPU it read and overwrote other memory at the first decode step."""
    from longseq.attention_backends.vllm.common import BackendTrace
    from longseq.attention_backends.vllm.kda import forward_split_qkv

    gen = torch.Generator().manual_seed(11)
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=gen) * scale  # noqa: E731
    slots, real, padded = [4, 1, 6], 3, 5  # 3 decodes (slot 1 is the first after the null block), graph-padded to 5
    raw, conv_pool, state_pool = paged_kda_cache(SLOTS, gen)
    conv_w = rnd(3 * C, W, scale=0.5)
    base = dict(prefix="model.layers.0.self_attn", head_dim=D, A_log=rnd(1, 1, H, 1, scale=0.5),
                dt_bias=rnd(C, scale=0.5), **{f"{n}_conv1d": types.SimpleNamespace(weight=w[:, None], bias=None)
                                              for n, w in zip("qkv", conv_w.split(C))})
    m = types.SimpleNamespace(num_actual_tokens=padded, num_prefills=0, num_decodes=real, spec_sequence_masks=None,
                              has_initial_state=None, non_spec_query_start_loc=torch.arange(padded + 1, dtype=torch.int32),
                              non_spec_state_indices_tensor=torch.tensor(slots + [0] * (padded - real), dtype=torch.int32))
    T = padded + 1  # one more row than the step's tokens: beyond num_actual_tokens nothing may be read or written
    args = (rnd(T, C), rnd(T, C), rnd(T, C), rnd(1, T, H, D), rnd(1, T, H).sigmoid())

    raw_vllm, before = raw.clone(), state_pool[slots].clone()
    vllm_layer = types.SimpleNamespace(**base, kv_cache=(torch.as_strided(raw_vllm, conv_pool.shape, conv_pool.stride(),
                                                                          conv_pool.storage_offset()),
                                                         torch.as_strided(raw_vllm, state_pool.shape, state_pool.stride(),
                                                                          state_pool.storage_offset())))
    out_vllm = torch.zeros(1, T, H, D)
    vllm026_decode_forward(vllm_layer, m, *args, out_vllm)

    trace = BackendTrace("kda-test", LongSeqConfig())
    layer = types.SimpleNamespace(**base, kv_cache=(conv_pool, state_pool), longseq_trace=trace,
                                  longseq_config=LongSeqConfig(kda=True), longseq_framework_forward=None)
    patch_vllm_ops(monkeypatch, layer, {"m": m})
    out = torch.zeros(1, T, H, D)
    forward_split_qkv(layer, *args, out)

    assert trace.counts["forward_calls"] == 1  # the decode ran on our kernel, not the framework's
    torch.testing.assert_close(out[0, :real], out_vllm[0, :real], atol=2e-3, rtol=2e-3)
    assert out[0, padded:].abs().max() == 0 and out_vllm[0, padded:].abs().max() == 0
    torch.testing.assert_close(raw, raw_vllm, atol=2e-3, rtol=2e-3)  # every page: states, conv states, padding
    assert (state_pool[slots] - before).abs().amin(dim=(-1, -2)).gt(0).all()  # every real slot's state was updated
