"""Gradient features (dense and factored) against explicit gradients and projections."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdpo
from jaxdpo.features import factored_plan
from jaxdpo.projection import as_key, dense_projection_matrix
from tests.tiny import sequences, tiny_model, trained_lora
from tests.tolerance import assert_close

DIM = 64
BETA = 0.5
PROJECTION_ULPS = 1024
"""A feature sums ± projections of every gradient entry (and the gradient itself is a float32 sum
with cancellation, see test_rewards): compared at the scale of the largest feature."""


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    lora = trained_lora(model)
    ids, response, attention = sequences()
    grads = jaxdpo.reward_gradients(model, lora, ids, response, beta=BETA, attention_mask=attention, chunk_size=2)
    return model, lora, (ids, response, attention), grads


def features(setup, **kwargs):
    model, lora, (ids, response, attention), _ = setup
    options = dict(beta=BETA, dim=DIM, seed=7, chunk_size=2, attention_mask=attention) | kwargs
    return np.asarray(jaxdpo.gradient_features(model, lora, ids, response, **options))


def flat_grads(grads) -> np.ndarray:
    leaves = jax.tree.leaves(grads)  # the projection's leaf order
    return np.concatenate([np.asarray(leaf, np.float64).reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)


def test_dense_features_are_the_projected_unit_gradients(setup):
    grads = setup[3]
    flat = flat_grads(grads)
    sizes = [int(np.prod(leaf.shape[1:])) for leaf in jax.tree.leaves(grads)]
    matrix = dense_projection_matrix(sizes, dim=DIM, key=7)
    unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    assert_close(features(setup, method="dense"), unit @ matrix.T, ulps=PROJECTION_ULPS)
    assert_close(features(setup, method="dense", normalize=False), flat @ matrix.T, ulps=PROJECTION_ULPS)


def test_factored_features_are_the_kronecker_projection_of_the_gradients(setup):
    _, lora, _, grads = setup
    plan = factored_plan(lora, DIM)
    key = as_key(7)
    probes = []
    for b, block in enumerate(plan.blocks):
        target, side = block.name.split(".")
        per_layer = []
        for layer in range(plan.num_layers):
            p_left, p_right = (np.asarray(m, np.float64) for m in plan.factors(key, b, layer))
            gradient = np.asarray(grads.params[target][side][:, layer], np.float64)
            per_layer.append(np.einsum("ka,nab,jb->nkj", p_left, gradient, p_right))
        probes.append(np.stack(per_layer, axis=1))
    raw = np.asarray(plan.select([jnp.asarray(p) for p in probes]), np.float64)
    assert_close(features(setup, method="factored", normalize=False), raw, ulps=PROJECTION_ULPS)
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    assert_close(features(setup, method="factored"), unit, ulps=PROJECTION_ULPS)


@pytest.mark.parametrize("method", ["dense", "factored"])
def test_feature_inner_products_match_normalized_gradients_within_jl_error(setup, method):
    flat = flat_grads(setup[3])
    unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    exact = unit @ unit.T
    dim = 2048
    g = np.asarray(features(setup, method=method, dim=dim), np.float64)
    assert np.abs(g @ g.T - exact).max() < 5 * np.sqrt(2 / dim)


def test_seed_determinism_and_chunking(setup):
    first = features(setup, method="factored")
    np.testing.assert_array_equal(first, features(setup, method="factored"))
    assert not np.allclose(first, features(setup, method="factored", seed=8))
    assert_close(features(setup, method="factored", chunk_size=4), first, ulps=PROJECTION_ULPS)
    dense = features(setup, method="dense")  # one projection pass for all 4 examples
    assert_close(features(setup, method="dense", projection_batch=3), dense, ulps=PROJECTION_ULPS)  # 3 + 1 padded


def test_features_feed_select_batch_pairs(setup):
    g = features(setup, method="factored")
    pairs = np.array([[0, 1], [0, 2], [1, 2], [2, 3]], np.int32)
    result = jaxdpo.select_batch(g, 2, pairs=pairs)
    phi = g[pairs[:, 0]] - g[pairs[:, 1]]
    np.testing.assert_array_equal(result.indices, jaxdpo.select_batch(phi, 2).indices)


@pytest.mark.usefixtures("unchecked_shapes")
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="sketch"), "method must be one of"),
        (dict(dim=0), "dim must be a positive int"),
        (dict(beta=-1.0), "beta must be > 0"),
        (dict(chunk_size=0), "chunk_size must be >= 1"),
        (dict(projection_batch=0), "projection_batch must be >= 1"),
        (dict(dim=3, method="factored"), "below the number of projected blocks"),
    ],
)
def test_bad_arguments(setup, kwargs, match):
    with pytest.raises(ValueError, match=match):
        features(setup, **kwargs)
