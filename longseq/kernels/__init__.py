"""Pure tensor functions (torch / triton). No vLLM, no SGLang, no config: one folder per op,
``naive.py`` holding the plain PyTorch reference."""
