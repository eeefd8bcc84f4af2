"""jaxdpo: ActiveDPO in JAX — gradient-based active selection of preference pairs, then DPO."""

__version__ = "0.1.0"
