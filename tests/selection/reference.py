"""Independent float64 NumPy references for the selection tests: explicit V, np.linalg.inv."""

from __future__ import annotations

import numpy as np


def v_matrix(dim: int, reg: float, prior=None) -> np.ndarray:
    v = reg * np.eye(dim)
    if prior is not None and len(prior):
        prior = np.asarray(prior, np.float64)
        v += prior.T @ prior
    return v


def quad_scores(phi: np.ndarray, v: np.ndarray) -> np.ndarray:
    """φ_iᵀ V⁻¹ φ_i for every row, with an explicit inverse."""
    return np.einsum("nd,de,ne->n", phi, np.linalg.inv(v), phi)


def brute_force_greedy(phi, batch_size: int, reg: float, prior=None, mask=None):
    """Eq. (3) + Eq. (4) the slow way: invert V before every pick and re-score everyone."""
    phi = np.asarray(phi, np.float64)
    v = v_matrix(phi.shape[1], reg, prior)
    eligible = np.ones(len(phi), bool) if mask is None else np.array(mask, bool)
    indices, scores = [], []
    for _ in range(batch_size):
        s = np.where(eligible, quad_scores(phi, v), -np.inf)
        i = int(np.argmax(s))
        indices.append(i)
        scores.append(np.sqrt(max(s[i], 0.0)))
        eligible[i] = False
        v += np.outer(phi[i], phi[i])
    return np.array(indices), np.array(scores)


def replay_gaps(phi, indices, reg: float, prior=None, mask=None):
    """Replay given picks in float64. For each pick: (exact max score among eligible − exact score
    of the pick, exact score of the pick), both on the squared scale φᵀV⁻¹φ."""
    phi = np.asarray(phi, np.float64)
    v = v_matrix(phi.shape[1], reg, prior)
    eligible = np.ones(len(phi), bool) if mask is None else np.array(mask, bool)
    gaps, exact = [], []
    for i in np.asarray(indices):
        assert eligible[i], f"pick {i} was not eligible"
        s = quad_scores(phi, v)
        gaps.append(np.max(s[eligible]) - s[i])
        exact.append(s[i])
        eligible[i] = False
        v += np.outer(phi[i], phi[i])
    return np.array(gaps), np.array(exact)
