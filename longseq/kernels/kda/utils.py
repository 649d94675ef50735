"""Shape checks and small helpers shared by the KDA kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK_SIZE = 64  # rows per chunk of ``kda_gate_chunk_cumsum`` (fla's KDA chunk size)
MAX_HEAD_DIM = 128  # register budget of the recurrent kernel's [BV, K] state tile


def check_head_dims(K: int, V: int, where: str) -> None:
    """Refuse head dims the kernels do not handle, naming them."""
    if K > MAX_HEAD_DIM or V > MAX_HEAD_DIM or K < 16 or V < 16:
        raise NotImplementedError(
            f"{where}: head dims K={K}, V={V} are not supported by longseq's KDA kernels "
            f"(each must be in [16, {MAX_HEAD_DIM}])")


def check_state(state: torch.Tensor | None, H: int, K: int, V: int, where: str, name: str = "initial_state"):
    """The recurrent state must be fp32 with layout ``[..., H, V, K]`` (V first, as vLLM/SGLang store it)."""
    if state is None:
        return
    if state.dtype != torch.float32:
        raise ValueError(f"{where}: `{name}` must be float32 (longseq's KDA kernels keep the state in fp32), "
                         f"got {state.dtype}")
    if state.shape[-3:] != (H, V, K):
        raise ValueError(f"{where}: `{name}` must have shape [..., H={H}, V={V}, K={K}] (V-first state layout), "
                         f"got {tuple(state.shape)}")
    if state.stride()[-3:] != (V * K, K, 1):
        raise ValueError(f"{where}: `{name}` must be contiguous within each [H, V, K] slot")


def prepare_chunk_indices(cu_seqlens: torch.Tensor, chunk_size: int = CHUNK_SIZE) -> torch.Tensor:
    """``[NT, 2]`` int32 (sequence index, chunk index within the sequence) for every chunk of a varlen batch.

    Reads ``cu_seqlens`` on the host (one sync, as fla does for its varlen chunk kernels).
    """
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    seq, chunk = [], []
    for i, n in enumerate(lens):
        nt = triton.cdiv(int(n), chunk_size)
        seq.extend([i] * nt)
        chunk.extend(range(nt))
    return torch.tensor([seq, chunk], dtype=torch.int32, device=cu_seqlens.device).T.contiguous()


@triton.jit
def sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN: tl.constexpr):
    """(bos, eos) token rows of sequence i_n: from cu_seqlens (varlen) or as batch row i_n of length T."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    return bos, eos


@triton.jit
def chunk_bounds(cu_seqlens, chunk_indices, i_c, i_b, T, IS_VARLEN: tl.constexpr):
    """(bos, eos, chunk index within its sequence) of program chunk i_c (varlen: via chunk_indices)."""
    i_n = i_b
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_c * 2).to(tl.int32)
        i_c = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int32)
    bos, eos = sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    return bos, eos, i_c
