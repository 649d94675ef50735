"""LONGSEQ_DUO_PATTERN=random[:seed]: a seeded random pattern built for the model's shape at start-up."""

from __future__ import annotations

import pytest
import torch

from longseq.attention_backends.core.duo import StreamingHeadMask, rank_streaming_mask
from longseq.attention_backends.core.duo_pattern import random_pattern
from longseq.config import LongSeqConfig, LongSeqConfigError


def _config(**kw):
    return LongSeqConfig(attention="duo", **kw)


def test_random_pattern_fits_any_model_and_is_seeded():
    mask = rank_streaming_mask(_config(duo_pattern="random", duo_sparsity=0.5), 32, 8)
    assert tuple(mask.is_streaming.shape) == (32, 8)
    assert mask.is_streaming.sum().item() == 128  # half of all KV heads
    assert (mask.sink_size, mask.recent_size) == (64, 256)  # the defaults
    again = rank_streaming_mask(_config(duo_pattern="random:0", duo_sparsity=0.5), 32, 8)
    assert mask.is_streaming.equal(again.is_streaming)
    other = rank_streaming_mask(_config(duo_pattern="random:7", duo_sparsity=0.5), 32, 8)
    assert not mask.is_streaming.equal(other.is_streaming)
    expected = StreamingHeadMask.from_pattern(random_pattern(32, 8, 7), sparsity=0.5).is_streaming
    assert other.is_streaming.equal(expected)


def test_random_pattern_sizes_tp_and_errors():
    cfg = _config(duo_pattern="random:3", duo_sparsity=0.25, duo_sink=4, duo_recent=8)
    full = rank_streaming_mask(cfg, 4, 8)
    rank1 = rank_streaming_mask(cfg, 4, 8, tp_rank=1, tp_size=2)
    assert (rank1.sink_size, rank1.recent_size) == (4, 8)
    assert rank1.is_streaming.equal(full.is_streaming[:, 4:])  # every rank builds the same pattern
    with pytest.raises(LongSeqConfigError, match="seed"):
        rank_streaming_mask(_config(duo_pattern="random:x"), 4, 8)
    with pytest.raises(LongSeqConfigError, match="model's shape"):
        StreamingHeadMask.from_config(_config(duo_pattern="random"))


def test_masks_build_on_cpu_while_default_device_is_elsewhere():
    """vLLM sets torch's default device to the GPU while it builds the model, when the mask is made: every tensor
    must name its device (a CPU generator used with a GPU default device crashed the engine at start). The meta
    device stands in for the GPU here: a tensor left on the default device cannot be read back."""
    cfg = _config(duo_pattern="random:5", duo_sparsity=0.5)
    want = rank_streaming_mask(cfg, 4, 8, tp_rank=1, tp_size=2).is_streaming
    memory = _config(duo_pattern="random:5", duo_sparsity=0.5, duo_memory=True)  # re-quantized per layer
    want_memory = rank_streaming_mask(memory, 4, 8, tp_rank=1, tp_size=2).is_streaming
    with torch.device("meta"):
        got = rank_streaming_mask(cfg, 4, 8, tp_rank=1, tp_size=2).is_streaming
        got_memory = rank_streaming_mask(memory, 4, 8, tp_rank=1, tp_size=2).is_streaming
        builtin = rank_streaming_mask(_config(duo_pattern="smollm2-135m-instruct", duo_sparsity=0.5), 30, 3, 2, 3)
    assert got.device.type == "cpu" and got.equal(want)
    assert got_memory.device.type == "cpu" and got_memory.equal(want_memory)
    assert want_memory.sum(dim=1).tolist() == [2, 2, 2, 2]  # one count per layer: half of this rank's 4 heads
    assert builtin.is_streaming.device.type == "cpu" and builtin.is_streaming.shape == (30, 1)
