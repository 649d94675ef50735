"""Offline tools (``longseq.tools``): calibration scripts run by the ``longseq`` CLI, never by the plugin.

- :mod:`longseq.tools.duo_calibrate`: DuoAttention gate optimization (``longseq duo calibrate``).

Importing a tool module is cheap (torch and transformers are imported inside its functions).
"""
