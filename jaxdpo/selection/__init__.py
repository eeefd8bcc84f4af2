"""Batch selection: the ActiveDPO greedy rule (Eq. 3-4) and the baselines (SHARP / W-SHARP among
them), as pure functions."""

from jaxdpo.selection.api import (
    SelectionResult,
    SelectionStats,
    check_batch,
    select_batch,
    select_on_mesh,
    v_inv_norms,
)
from jaxdpo.selection.baselines import (
    predictive_entropy,
    select_apo,
    select_certainty,
    select_entropy,
    select_hybrid,
    select_near_tie,
    select_random,
    select_uncertainty,
)
from jaxdpo.selection.registry import SELECTORS, SelectionPool, Selector, make_selector
from jaxdpo.selection.sharded import PairsLayout, PlacedPairs, layout_pairs, place_pairs
from jaxdpo.selection.sharpe import select_sharpe, sharpe_ratio

__all__ = [
    "SELECTORS",
    "PairsLayout",
    "PlacedPairs",
    "SelectionPool",
    "SelectionResult",
    "SelectionStats",
    "Selector",
    "check_batch",
    "layout_pairs",
    "make_selector",
    "place_pairs",
    "predictive_entropy",
    "select_apo",
    "select_batch",
    "select_certainty",
    "select_entropy",
    "select_hybrid",
    "select_near_tie",
    "select_on_mesh",
    "select_random",
    "select_sharpe",
    "select_uncertainty",
    "sharpe_ratio",
    "v_inv_norms",
]
