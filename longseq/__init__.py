"""longseq: long-context attention techniques as a plugin for vLLM and SGLang.

Importing this package is cheap: it imports neither torch, vLLM nor SGLang. The frameworks
load it through their plugin entry points (``longseq.plugin.vllm:register`` and
``longseq.plugin.sglang:register``).
"""

__version__ = "0.1.0"
