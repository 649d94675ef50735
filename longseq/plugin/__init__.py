"""Registration with vLLM and SGLang, configuration, version shims and the ``longseq`` CLI.

Everything that reads ``LONGSEQ_*`` environment variables or depends on a framework version lives here.
"""
