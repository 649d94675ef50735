"""SGLang KDA (``LONGSEQ_KDA=1``): the plugin's hook on SGLang's KDA backend puts longseq's decode kernel in its
``KDAKernelDispatcher`` (extend and verify stay SGLang's), ``LONGSEQ_KDA=0`` registers nothing, bad shapes and
settings stop start-up, and ``LongSeqKDAKernel`` (packed decode, decode over SGLang's state pool) matches the
naive KDA reference on random inputs (kernels in Triton's interpreter on CPU).

SGLang's own vendored KDA kernels do not run on CPU (``fla/utils.py`` needs a device context), so the reference
here is ``longseq.kernels.kda.naive``.
"""

from __future__ import annotations

import importlib
import pkgutil
import types

import pytest
import torch

pytestmark = pytest.mark.sglang
triton = pytest.importorskip("triton")
from triton_interp import import_kernels, interpreter_env  # noqa: E402

_KDA_MODULES = [f"longseq.kernels.kda.{m.name}" for m in pkgutil.iter_modules(
    importlib.import_module("longseq.kernels.kda").__path__)]
kk = import_kernels(*_KDA_MODULES, *_KDA_MODULES, "longseq.kernels.kda")[-1]  # twice: order-independent
from longseq.kernels.kda.naive import l2norm  # noqa: E402

_interpreter = pytest.fixture(autouse=True, scope="module")(interpreter_env)
H, D, SLOTS = 2, 32, 6


@pytest.fixture
def hook_registry(monkeypatch):
    """SGLang's HookRegistry and our one-shot flag, restored after the test (the patched __init__ too)."""
    from sglang.srt.layers.attention.linear.kda_backend import KDAAttnBackend
    from sglang.srt.plugins.hook_registry import HookRegistry

    import longseq.plugin.sglang as plugin

    hooks = {k: list(v) for k, v in HookRegistry._hooks.items()}
    patched, init = set(HookRegistry._patched), KDAAttnBackend.__dict__["__init__"]
    monkeypatch.setattr(plugin, "_kda_hooked", False)
    yield HookRegistry
    HookRegistry._hooks.clear()
    HookRegistry._hooks.update(hooks)
    HookRegistry._patched.clear()
    HookRegistry._patched.update(patched)
    KDAAttnBackend.__init__ = init


def _our_hooks(registry):
    from longseq.plugin.sglang import KDA_BACKEND_INIT, _install_kda_kernels_after_init

    return [h for _, h, _ in registry._hooks.get(KDA_BACKEND_INIT, []) if h is _install_kda_kernels_after_init]


def test_kda_off_registers_no_hook(hook_registry, longseq_env):
    from longseq.plugin.sglang import register

    longseq_env()
    register()
    longseq_env(LONGSEQ_KDA="0")
    register()
    assert _our_hooks(hook_registry) == []


def _dispatcher_and_runner(temporal):
    from sglang.srt.layers.attention.linear.kda_backend import KDAKernelDispatcher
    from sglang.srt.layers.attention.linear.utils import LinearAttnKernelBackend as B

    dispatcher = KDAKernelDispatcher(B.TRITON, B.TRITON, B.TRITON)
    pool = types.SimpleNamespace(mamba_cache=types.SimpleNamespace(temporal=temporal))
    runner = types.SimpleNamespace(req_to_token_pool=types.SimpleNamespace(mamba_pool=pool))
    return types.SimpleNamespace(kernel_dispatcher=dispatcher), runner


@pytest.fixture
def no_state_tracking(monkeypatch):
    """The resolved server arguments the hook reads (not published outside a server): no extra state buffer."""
    import longseq.plugin.sglang as plugin

    monkeypatch.setattr(plugin, "_mamba_state_tracking", lambda: False)
    return monkeypatch


def test_kda_on_hooks_backend_and_swaps_dispatcher_kernels(hook_registry, longseq_env, no_state_tracking):
    """Decode goes to our kernel; extend stays SGLang's."""
    from sglang.srt.layers.attention.linear.kernels.kda_triton import TritonKDAKernel

    from longseq.attention_backends.sglang.kda import LongSeqKDAKernel
    from longseq.plugin.sglang import KDA_BACKEND_INIT, _install_kda_kernels_after_init, register

    longseq_env(LONGSEQ_KDA="1")
    register()
    register()  # SGLang calls plugins in every process, sometimes more than once
    assert len(_our_hooks(hook_registry)) == 1
    hook_registry.apply_hooks()
    assert KDA_BACKEND_INIT in hook_registry._patched
    backend, runner = _dispatcher_and_runner(torch.zeros(3, SLOTS, H, D, D))
    _install_kda_kernels_after_init(None, backend, runner)  # what the patched KDAAttnBackend.__init__ runs last
    d = backend.kernel_dispatcher
    assert isinstance(d.decode_kernel, LongSeqKDAKernel)
    assert type(d.extend_kernel) is TritonKDAKernel
    assert type(d.verify_kernel) is TritonKDAKernel and d.supports_packed_decode


def test_unsupported_state_pool_fails_at_startup(longseq_env, no_state_tracking):
    import longseq.config as cfg_mod
    import longseq.plugin.sglang as plugin

    monkeypatch = no_state_tracking

    from longseq.config import LongSeqConfigError
    from longseq.plugin.sglang import _install_kda_kernels_after_init

    longseq_env(LONGSEQ_KDA="1")
    with pytest.raises(LongSeqConfigError, match=r"LONGSEQ_KDA=1: the KDA recurrent state is torch.bfloat16"):
        _install_kda_kernels_after_init(None, *_dispatcher_and_runner(torch.zeros(1, 2, H, D, D, dtype=torch.bfloat16)))
    big = kk.MAX_HEAD_DIM * 2
    with pytest.raises(LongSeqConfigError, match=rf"head dims \(K={big}, V={big}\) exceed the {kk.MAX_HEAD_DIM}"):
        _install_kda_kernels_after_init(None, *_dispatcher_and_runner(torch.zeros(1, 1, 1, big, big)))
    monkeypatch.setattr(plugin, "_mamba_state_tracking", lambda: True)
    backend, runner = _dispatcher_and_runner(torch.zeros(1, 2, H, D, D))
    _install_kda_kernels_after_init(None, backend, runner)  # default: SGLang's extend kernel snapshots the states
    assert backend.kernel_dispatcher.extend_kernel.supports_track_state_snapshot
    monkeypatch.setenv("LONGSEQ_KDA_PREFILL", "longseq")  # longseq's chunk prefill is gone: refused at start-up
    monkeypatch.setattr(cfg_mod, "_CACHED", None)
    with pytest.raises(LongSeqConfigError, match="longseq's KDA chunk prefill kernel was removed"):
        _install_kda_kernels_after_init(None, *_dispatcher_and_runner(torch.zeros(1, 2, H, D, D)))
    monkeypatch.delenv("LONGSEQ_KDA_PREFILL")
    monkeypatch.setenv("LONGSEQ_KDA", "maybe")  # a bad setting stops the KDA backend at start-up: config error
    monkeypatch.setattr(cfg_mod, "_CACHED", None)
    with pytest.raises(LongSeqConfigError, match="LONGSEQ_KDA='maybe' must be a boolean"):
        _install_kda_kernels_after_init(None, *_dispatcher_and_runner(torch.zeros(1, 2, H, D, D)))


def test_unsupported_features_are_named():
    from longseq.attention_backends.sglang.kda import LongSeqKDAKernel

    kernel, z = LongSeqKDAKernel(), torch.zeros(1, 2, H, D)
    with pytest.raises(NotImplementedError, match="no KDA extend \\(chunk prefill\\) kernel; SGLang's extend kernel"):
        kernel.extend(z, z, z, z, z[..., 0], ssm_states=torch.zeros(2, H, D, D), cache_indices=torch.tensor([0]),
                      query_start_loc=torch.tensor([0, 2]), A_log=torch.zeros(H))
    with pytest.raises(NotImplementedError, match="enable-linear-replayssm"):
        kernel.packed_decode(torch.zeros(1, 3 * H * D), z, z, A_log=torch.zeros(H), dt_bias=torch.zeros(H * D),
                             scale=1.0, ssm_states=torch.zeros(2, H, D, D), cache_indices=torch.tensor([0]),
                             num_v_heads=H, head_v_dim=D, replayssm_d=torch.zeros(1))


def _reference(q, k, v, raw_g, raw_beta, A_log, dt_bias, state0, lower_bound):
    """Naive KDA for one sequence: q/k/v ``[L, H, D]`` post-conv; returns (o ``[L, H, D]``, state ``[H, V, K]``)."""
    g = kk.naive_kda_gate(raw_g[None], A_log, dt_bias, lower_bound=lower_bound)
    o, s = kk.naive_recurrent_kda(l2norm(q[None]), l2norm(k[None]), v[None], g, raw_beta.sigmoid()[None],
                                  initial_state=state0.transpose(-1, -2)[None], output_final_state=True)
    return o[0], s[0].transpose(-1, -2)


@pytest.mark.parametrize("lower_bound", [None, -4.0])
def test_kernel_decode_matches_naive(lower_bound):
    """Two requests (slot 1 continues a stored state, slot 4 is fresh: SGLang zeroes it), their prompts run by the
    naive recurrence (standing in for SGLang's extend kernel), then packed decode and plain decode; outputs and pool
    rows vs the naive recurrence over each request's whole history."""
    from longseq.attention_backends.sglang.kda import LongSeqKDAKernel

    gen = torch.Generator().manual_seed(11)
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=gen) * scale  # noqa: E731
    A_log, dt_bias = rnd(H, scale=0.5), rnd(H * D, scale=0.5)
    pool = rnd(SLOTS, H, D, D, scale=0.1)
    pool[4] = 0
    before = pool.clone()
    slots, lens = [1, 4], [5, 3]
    total = [n + 2 for n in lens]
    seq = [(rnd(n, H, D), rnd(n, H, D), rnd(n, H, D), rnd(n, H, D), rnd(n, H)) for n in total]  # q k v raw_g raw_b
    kernel, idx = LongSeqKDAKernel(trace={}), torch.tensor(slots, dtype=torch.int32)
    for i, slot in enumerate(slots):  # the prompt, as the framework's extend leaves it in the pool
        pool[slot] = _reference(*(x[:lens[i]] for x in seq[i]), A_log, dt_bias, before[slot], lower_bound)[1]

    cat = lambda j, a, b: torch.cat([s[j][a(i):b(i)] for i, s in enumerate(seq)])[None]  # noqa: E731
    step = [cat(j, lambda i, t=t: lens[i] + t, lambda i, t=t: lens[i] + t + 1) for t in (0, 1) for j in range(5)]
    mixed = torch.cat([x[0].flatten(-2) for x in step[:3]], dim=-1)
    o_packed = kernel.packed_decode(mixed, step[3][0].flatten(-2), step[4][0], A_log=A_log, dt_bias=dt_bias,
                                    scale=D ** -0.5, ssm_states=pool, cache_indices=idx, num_v_heads=H,
                                    head_v_dim=D, lower_bound=lower_bound)
    q2, k2, v2, g2, b2 = step[5:]
    o_dec = kernel.decode(q2, k2, v2, g2[0].flatten(-2), b2[0], A_log=A_log, dt_bias=dt_bias, ssm_states=pool,
                          cache_indices=idx, query_start_loc=torch.arange(3, dtype=torch.int32),
                          lower_bound=lower_bound)
    assert kernel.trace == {"packed_decode": 1, "decode": 1}
    for i, slot in enumerate(slots):
        o_ref, s_ref = _reference(*seq[i], A_log, dt_bias, before[slot], lower_bound)
        torch.testing.assert_close(o_packed[0, i], o_ref[lens[i]], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(o_dec[0, i], o_ref[lens[i] + 1], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(pool[slot], s_ref, atol=2e-3, rtol=2e-3)
    others = [s for s in range(SLOTS) if s not in slots]
    assert torch.equal(pool[others], before[others])
