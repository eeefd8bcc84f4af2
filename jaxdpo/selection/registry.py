"""Selectors by name, over one pool type, so experiments choose a method with a string.

A `SelectionPool` carries everything any selector may read; each selector declares the fields it
`requires`, so a pipeline computes only those (gradient features are expensive, margins need
implicit rewards, entropies need sampled log-probs). Adding a method: its selection function and
one `Rule` here; a pool field no method read before also needs its producer in
`jaxdpo.experiment.pool.PRODUCERS`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

from jax.sharding import Mesh
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from jaxdpo.selection import baselines
from jaxdpo.selection.api import SelectionResult, select_batch, select_on_mesh
from jaxdpo.selection.sharded import place_pairs
from jaxdpo.selection.sharpe import sharp_rule, w_sharp_rule
from jaxdpo.sharding import to_host


class SelectionPool(NamedTuple):
    """One round's candidate triplets (n of them) and what the selectors read from them.

    features: per-response gradient features g `[r, d]` (with `pairs`) or φ `[n, d]` (without).
    pairs: `[n, 2]` response indices of each candidate (φ_i = g[a_i] − g[b_i]).
    prior: φ of the triplets labeled so far `[p, d]` (p may be 0; None: none yet), recomputed under
      the current model.
    margins: implicit-reward margins r(x, y_a) − r(x, y_b) `[n]`.
    prompt_entropy: predictive entropy of each prompt `[prompts]`; pair_prompt_ids `[n]` maps
      candidates to prompts.
    apo_features / apo_prior: frozen-model features for APO (same layout as features / prior).
    mask: `[n]` bool, eligible candidates.
    mesh: the run's device mesh, if any: selectors that can split their candidates over it do.
    """

    num_candidates: int
    features: Float[ArrayLike, "r d"] | None = None
    pairs: Int[ArrayLike, "n 2"] | None = None
    prior: Float[ArrayLike, "p d"] | None = None
    margins: Float[ArrayLike, " n"] | None = None
    prompt_entropy: Float[ArrayLike, " prompts"] | None = None
    pair_prompt_ids: Int[ArrayLike, " n"] | None = None
    apo_features: Float[ArrayLike, "r h"] | None = None
    apo_prior: Float[ArrayLike, "p h"] | None = None
    mask: Bool[ArrayLike, " n"] | None = None
    mesh: Mesh | None = None


@dataclasses.dataclass(frozen=True)
class Selector:
    """A named selection rule bound to its options: `selector(pool, batch_size, key=key)`."""

    name: str
    requires: frozenset[str]
    policy: Literal["current", "initial"]
    options: dict[str, Any]
    select: Callable[..., SelectionResult]
    optional: frozenset[str] = frozenset()
    placed: Callable[..., SelectionResult] | None = None

    def __call__(self, pool: SelectionPool, batch_size: int, *, key: Array) -> SelectionResult:
        return self.select(self._checked(pool), batch_size, key, **self.options)

    def on_placed(self, pool: SelectionPool, batch_size: int, *, key: Array) -> SelectionResult:
        """The rule on every device of `pool.mesh`, with g, pairs and mask already laid out by
        `place_pairs` (indices into that layout): what `selector(pool, ...)` runs after placing
        them, so a memory plan can lower it from shapes. Only for rules that split over a mesh."""
        if self.placed is None:
            raise ValueError(f"selector {self.name!r} does not split its candidates over a mesh")
        return self.placed(self._checked(pool), batch_size, key, **self.options)

    def _checked(self, pool: SelectionPool) -> SelectionPool:
        missing = sorted(field for field in self.requires - self.optional if getattr(pool, field) is None)
        if missing:
            raise ValueError(f"selector {self.name!r} needs pool fields {missing}, which are None")
        return pool


def _activedpo(pool, batch_size, key, *, reg=1.0, strategy="auto"):
    """Eq. 3-4; with a mesh of several devices, on all of them (whole prompts per device)."""
    if pool.mesh is None or pool.mesh.size == 1 or pool.pairs is None:
        return select_batch(pool.features, batch_size, reg=reg, prior=pool.prior, mask=pool.mask, pairs=pool.pairs, strategy=strategy)
    placed = place_pairs(pool.features, pool.pairs, pool.mesh, mask=pool.mask)
    pool = pool._replace(features=placed.features, pairs=placed.pairs, mask=placed.mask)
    result = _activedpo_placed(pool, batch_size, key, reg=reg, strategy=strategy)
    return SelectionResult(placed.restore(result.indices), to_host(result.scores))


def _activedpo_placed(pool, batch_size, key, *, reg=1.0, strategy="auto"):
    """Eq. 3-4 on every device of `pool.mesh`, the pool's g, pairs and mask laid out by
    `place_pairs` (indices into that layout): the program a run on a mesh executes."""
    return select_on_mesh(
        pool.features, batch_size, mesh=pool.mesh, reg=reg, prior=pool.prior, mask=pool.mask, pairs=pool.pairs, strategy=strategy
    )[0]


def _random(pool, batch_size, key):
    return baselines.select_random(key, pool.num_candidates, batch_size, mask=pool.mask)


def _certainty(pool, batch_size, key):
    return baselines.select_certainty(pool.margins, batch_size, mask=pool.mask)


def _uncertainty(pool, batch_size, key):
    return baselines.select_uncertainty(pool.margins, batch_size, mask=pool.mask)


def _entropy(pool, batch_size, key):
    return baselines.select_entropy(
        pool.prompt_entropy, pool.pair_prompt_ids, batch_size, key=key, mask=pool.mask
    )


def _hybrid(pool, batch_size, key, *, ogf=16):
    return baselines.select_hybrid(
        pool.prompt_entropy, pool.pair_prompt_ids, pool.margins, batch_size, ogf=ogf, mask=pool.mask
    )


def _apo(pool, batch_size, key, *, reg=1e-5):
    return baselines.select_apo(
        pool.apo_features, batch_size, reg=reg, prior=pool.apo_prior, pairs=pool.pairs, mask=pool.mask
    )


def _near_tie(pool, batch_size, key, *, nu=1.0, reg=1.0):
    return baselines.select_near_tie(
        pool.margins, pool.features, batch_size, nu=nu, reg=reg, prior=pool.prior, pairs=pool.pairs, mask=pool.mask
    )


class Rule(NamedTuple):
    """A registered method: its selection function, the pool fields it reads, which policy
    generates the round's responses ("current": π_{θ_{t−1}}, as Algorithm 1; "initial": the
    initial model, for methods that never regenerate, as APO), and which of the fields it reads
    may be None (the prior before any label)."""

    select: Callable[..., SelectionResult]
    requires: frozenset[str]
    policy: Literal["current", "initial"] = "current"
    optional: frozenset[str] = frozenset()
    placed: Callable[..., SelectionResult] | None = None  # `select` once the pool is laid out over its mesh


_RULES: dict[str, Rule] = {
    "activedpo": Rule(_activedpo, frozenset({"features", "prior"}), optional=frozenset({"prior"}), placed=_activedpo_placed),
    "random": Rule(_random, frozenset()),
    "certainty": Rule(_certainty, frozenset({"margins"})),
    "uncertainty": Rule(_uncertainty, frozenset({"margins"})),
    "entropy": Rule(_entropy, frozenset({"prompt_entropy", "pair_prompt_ids"})),
    "hybrid": Rule(_hybrid, frozenset({"prompt_entropy", "pair_prompt_ids", "margins"})),
    "apo": Rule(_apo, frozenset({"apo_features", "apo_prior"}), policy="initial"),
    "near_tie": Rule(_near_tie, frozenset({"margins", "features", "prior"}), optional=frozenset({"prior"})),
    "sharp": Rule(sharp_rule, frozenset({"margins"})),
    "w_sharp": Rule(w_sharp_rule, frozenset({"margins"})),
}
_ALIASES = {"aplp": "hybrid"}

SELECTORS: tuple[str, ...] = tuple(sorted([*_RULES, *_ALIASES]))


def make_selector(name: str, **options: Any) -> Selector:
    """The selector registered under `name` ("aplp" is APLP's hybrid), bound to `options`.

    Raises ValueError for an unknown name or an option the rule does not take."""
    canonical = _ALIASES.get(name, name)
    if canonical not in _RULES:
        raise ValueError(f"unknown selection method {name!r}; known methods: {', '.join(SELECTORS)}")
    rule = _RULES[canonical]
    accepted = [p.name for p in inspect.signature(rule.select).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"selection method {name!r} takes options {accepted}, got unknown {unknown}")
    return Selector(canonical, rule.requires, rule.policy, dict(options), rule.select, rule.optional, rule.placed)
