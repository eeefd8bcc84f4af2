"""The cost plan of a selection: every static size and threshold of the search, computed once from
the static shapes (candidates and rows on one device, width, prior rows, batch) and the device kind.

Costs are counted in element reads of a pass over Φ (pairs mode: over g). A coordinate evaluation
of one candidate (its products with the prior rows and the picks' basis, `search`) and an exact
one (whitening and rotation) are matrix products: on a device that does `COMPUTE_RATIO` multiply-
adds in the time of one read, k of them cost about k/ratio reads per element.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

STRATEGIES = ("auto", "full", "lazy")
COMPUTE_RATIO = {"cpu": 4.0}  # multiply-adds per element read in a GEMM vs a pass (others: DEFAULT_RATIO)
DEFAULT_RATIO = 64.0
ROUND_SHARE = 16  # a round of coordinate evaluations costs about 1/ROUND_SHARE of a pass
MIN_CHUNK, MAX_CHUNK = 8, 4096  # coordinate evaluations per round
BLOCK = 4  # exact evaluations per round (the contenders left after the coordinate rounds)
CATCH_UP = 32  # pending updates applied per catch-up pass (one product of Φ with CATCH_UP directions)
GEMM_RATIO = {"cpu": 19.0}  # the same for a product of all of Φ with CATCH_UP directions (others: DEFAULT_RATIO)
# (measured on CPU: [2e5, 1024] × [1024, 32], squares summed, in 1.67 passes; the chunked products of a search run far below)
STALLS_BEFORE_FULL = 2  # consecutive stalled lazy picks before the batch goes on as "full"
PAIR_BOUNDS_FROM = 2**19  # pairs (no prior) from which the norms' bounds beat their exact pass (CPU: between 3e5 and 6e5)
ACTIVE_FROM, ACTIVE_SHARE, ACTIVE_ROUNDS = 2**17, 8, 24  # a lazy search over at least ACTIVE_FROM candidates (per
# device) first runs on the 1/ACTIVE_SHARE of highest bound, at most ACTIVE_ROUNDS chunks: each round reads
# (and takes the top chunk of) every bound of the set (measured on CPU at 1e6 pairs: 31k candidates 5-10 % faster than 125k)
BOUND_PASSES = 4  # the prior's leading directions in the bound pass cost about this many passes
SLACK = 64  # rounding allowance of an exact score, in ulps of the score
DRIFT = 16  # rounding allowance of one Sherman–Morrison update, in ulps of the score
CACHE_SHARE = 4  # candidates' prior products are kept when they take at most 1/CACHE_SHARE of Φ's memory
PREFETCH = 256  # rows of one product with the prior rows (it reads P once: about as long as a few rows)
TWO_STEP_TOP_K = 2**17  # vectors at least this long and …
TWO_STEP_SPREAD = 256  # … at least this many times k take the top k in two steps (`ranking.largest`)
WIDE_SPREAD = 4096  # … in blocks of 64 entries from n = WIDE_SPREAD·k on, else of 16 (measured on CPU)
COORDINATE_ULPS = 256  # allowance of a coordinate score in ulps of ‖x‖², plus cond(U) of the prior
# (measured at p = 450, d = 8192: at most 7 ulps up to cond(G) = 5e6, 59 at 5e7)


class Plan(NamedTuple):
    """Static sizes of one selection (per device)."""

    count: int  # candidates
    rows: int  # rows one pass reads (n, or the rows of g)
    dim: int
    width: int  # whitened width: d, or d + p for a prior of p < d rows
    prior_rows: int
    batch: int
    picks: int  # K = min(B, width): Householder reflectors
    lazy: bool
    values: bool  # initial scores are values with an error bound (not only upper bounds)
    prefetch: int  # candidates whose ŝ⁰ one product with the prior rows computes (0: products not cached)
    chunk: int  # coordinate evaluations per round
    block: int  # exact evaluations per round
    bound_rank: int  # leading prior directions in the bound pass (= p: the exact difference form)
    pair_bounds: bool  # pairs without a prior start from (‖g_a‖ + ‖g_b‖)², not from a pass over the pairs
    active: int  # a lazy search first runs on this many candidates of highest bound per device (0: on all)
    catch_up: int  # pending updates applied per catch-up pass
    stall_reads: float  # coordinate evaluations that cost one catch-up pass
    ratio: float

    @property
    def cached(self) -> bool:
        """Each candidate's products with the prior rows are kept once computed."""
        return self.prefetch > 0


def make_plan(
    strategy: Literal["auto", "full", "lazy"],
    count: int,
    rows: int,
    dim: int,
    prior_rows: int,
    batch: int,
    pairs: bool,
    backend: str,
) -> Plan:
    """The plan for `count` candidates over `rows` stored rows of width `dim` on one device (of
    those holding the candidates)."""
    ratio = COMPUTE_RATIO.get(backend, DEFAULT_RATIO)
    low = 0 < prior_rows < dim
    width = dim + prior_rows if low else dim
    k = min(batch, width)
    gathers = 2 if pairs else 1
    whiten = 2 * prior_rows if low else (dim if prior_rows else 0)
    coordinate = dim * (gathers + ((prior_rows if low else whiten) + k) / ratio)
    exact = dim * (gathers + (whiten + 2 * k * width / dim) / ratio)
    one_pass = rows * dim
    bound_rank = min(prior_rows, int(BOUND_PASSES * ratio)) if low else 0
    pair_bounds = pairs and not prior_rows and strategy != "full" and count >= PAIR_BOUNDS_FROM
    values = (not low or bound_rank == prior_rows) and not pair_bounds
    chunk = int(min(count, MAX_CHUNK, max(MIN_CHUNK, one_pass / (ROUND_SHARE * coordinate))))
    if strategy == "auto":
        lazy = not values or one_pass >= 2 * (chunk * coordinate + BLOCK * exact)
    else:
        lazy = strategy == "lazy"
    cached = low and CACHE_SHARE * count * prior_rows <= rows * dim  # each candidate's products with the prior rows kept
    catch_up = min(CATCH_UP, batch)
    catch_up_reads = one_pass * max(1.0, catch_up / GEMM_RATIO.get(backend, DEFAULT_RATIO))
    prefetch = min(count, PREFETCH) if cached else 0
    block = min(BLOCK, count)
    active = 0
    if lazy and count >= ACTIVE_FROM:
        active = max(min(count // ACTIVE_SHARE, ACTIVE_ROUNDS * chunk), chunk, prefetch, block)
        active = active if active < count else 0
    return Plan(
        count=count, rows=rows, dim=dim, width=width, prior_rows=prior_rows, batch=batch, picks=k, lazy=lazy,
        values=values, prefetch=prefetch, chunk=chunk, block=block, bound_rank=bound_rank, pair_bounds=pair_bounds, active=active,
        catch_up=catch_up, stall_reads=catch_up_reads / coordinate, ratio=ratio,
    )


