"""jaxdpo: ActiveDPO in JAX — gradient-based active selection of preference pairs, then DPO."""

from jaxdpo.selection import (
    SELECTORS,
    SelectionPool,
    SelectionResult,
    Selector,
    make_selector,
    select_batch,
    v_inv_norms,
)

__version__ = "0.1.0"

__all__ = [
    "SELECTORS",
    "SelectionPool",
    "SelectionResult",
    "Selector",
    "make_selector",
    "select_batch",
    "v_inv_norms",
]
