"""Kimi Delta Attention kernels (chunked prefill, recurrent decode, gate) with a naive reference."""
