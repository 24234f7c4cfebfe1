from .tuners import ptsam as _ptsam  # noqa: F401  (registers the PTSAM peft method)
