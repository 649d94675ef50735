"""Measuring tools shared by tests, benchmarks and notebooks (``longseq.eval``): teacher-forced fidelity of a
technique against dense through the real engine, and passkey prompts."""
