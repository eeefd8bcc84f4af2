"""Seeded random projections: exactness against explicit matrices, JL statistics, determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxdpo.projection import (
    BLOCK,
    as_key,
    dense_project,
    dense_projection_matrix,
    kronecker_project,
    plan_factored,
    rademacher,
)
from tests.tolerance import F32_EPS, assert_close


def test_dense_projection_equals_the_explicit_matrix_for_a_pytree():
    rng = np.random.default_rng(0)
    grads = {"a": rng.normal(size=(3, 4, 5)).astype(np.float32), "b": rng.normal(size=(3, BLOCK + 7)).astype(np.float32)}
    got = dense_project(grads, dim=24, key=jax.random.key(3))
    matrix = dense_projection_matrix([20, BLOCK + 7], dim=24, key=jax.random.key(3))
    flat = np.concatenate([grads["a"].reshape(3, -1), grads["b"]], axis=1)
    assert_close(got, flat @ matrix.T, ulps=1024)  # sums of ~2000 ±x terms
    assert set(np.unique(np.abs(matrix) * np.sqrt(24)).round(6)) == {1.0}  # Rademacher, scaled 1/√dim


def test_dense_projection_is_independent_of_batching_and_seeded():
    g = np.random.default_rng(1).normal(size=(6, 300)).astype(np.float32)
    whole = np.asarray(dense_project(g, dim=16, key=7))
    np.testing.assert_array_equal(np.asarray(dense_project(g[2:5], dim=16, key=7)), whole[2:5])
    np.testing.assert_array_equal(np.asarray(dense_project(g, dim=16, key=jax.random.key(7))), whole)
    assert not np.allclose(np.asarray(dense_project(g, dim=16, key=8)), whole)


@settings(max_examples=10)
@given(seed=st.integers(0, 1000))
def test_dense_projection_preserves_inner_products_within_jl_error(seed):
    rng = np.random.default_rng(seed)
    dim, k = 1024, 3000
    g = rng.normal(size=(8, k)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    g[1] = 0.6 * g[0] + 0.8 * g[1]  # a correlated pair
    y = np.asarray(dense_project(g, dim=dim, key=seed), np.float64)
    exact = g.astype(np.float64) @ g.T.astype(np.float64)
    # each projected inner product has standard deviation ≤ √(2/dim) for unit vectors
    assert np.abs(y @ y.T - exact).max() < 5 * np.sqrt(2 / dim)


def test_dense_projection_is_unbiased_over_seeds():
    rng = np.random.default_rng(2)
    g, h = rng.normal(size=(2, 200)).astype(np.float32)
    pairs = np.stack([g, h])
    estimates = []
    for seed in range(300):
        y = np.asarray(dense_project(pairs, dim=8, key=seed), np.float64)
        estimates.append(y[0] @ y[1])
    exact = float(g.astype(np.float64) @ h)
    stderr = np.std(estimates) / np.sqrt(len(estimates))
    assert abs(np.mean(estimates) - exact) < 4 * stderr


def test_plan_spreads_exactly_dim_coordinates():
    shapes = [("q.a", 32, 4, 1), ("q.b", 4, 48, 0), ("down.a", 48, 4, 1), ("down.b", 4, 32, 0)]
    plan = plan_factored(shapes, num_layers=3, dim=1000)
    assert plan.gather.shape == (1000,) and len(np.unique(plan.gather)) == 1000
    counts = np.round(1 / plan.scale**2).astype(int)
    assert set(np.unique(counts)) <= {83, 84}  # 1000 over 12 blocks
    for block in plan.blocks:  # the rank side is never projected wider than the rank
        rank_width = block.k_right if block.name.endswith(".a") else block.k_left
        assert rank_width <= 4 and block.k_left * block.k_right >= 84
    with pytest.raises(ValueError, match="below the number of projected blocks"):
        plan_factored(shapes, num_layers=3, dim=11)


def test_kronecker_projection_equals_projecting_the_formed_gradient():
    rng = np.random.default_rng(3)
    left, right = rng.normal(size=(2, 5, 6)), rng.normal(size=(2, 5, 7))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    p_left, p_right = np.asarray(rademacher(jax.random.key(0), (3, 6))), np.asarray(rademacher(jax.random.key(1), (4, 7)))
    got = kronecker_project(jnp.asarray(left), jnp.asarray(right), p_left, p_right, token_mask=mask)
    gradient = np.einsum("nta,ntb,nt->nab", left, right, mask)  # G = Σ_t x_t δ_tᵀ
    expected = np.einsum("ka,nab,jb->nkj", p_left, gradient, p_right)  # vec(P_l G P_rᵀ) = (P_l ⊗ P_r) vec(G)
    assert_close(got, expected, ulps=256)


def test_factored_features_are_unbiased_and_match_jl_error():
    """Features of block-structured gradients built from the plan, against exact inner products."""
    rng = np.random.default_rng(4)
    shapes = [("w.a", 12, 3, 1), ("w.b", 3, 10, 0)]
    plan = plan_factored(shapes, num_layers=2, dim=60)
    grads = [rng.normal(size=(2, 2, 12, 3)), rng.normal(size=(2, 2, 3, 10))]  # [example, layer, rows, cols]
    exact = sum(np.einsum("lab,lab->", g[0], g[1]) for g in grads)

    def features(seed):
        key = as_key(seed)
        probes = []
        for b, g in enumerate(grads):
            per_layer = []
            for layer in range(2):
                p_l, p_r = (np.asarray(m, np.float64) for m in plan.factors(key, b, layer))
                per_layer.append(np.einsum("ka,nab,jb->nkj", p_l, g[:, layer], p_r))
            probes.append(np.stack(per_layer, axis=1))
        return np.asarray(plan.select([jnp.asarray(p) for p in probes]), np.float64)

    estimates = [features(seed)[0] @ features(seed)[1] for seed in range(200)]
    stderr = np.std(estimates) / np.sqrt(len(estimates))
    assert abs(np.mean(estimates) - exact) < 4 * stderr
    norms = [np.linalg.norm(features(seed)[0]) ** 2 for seed in range(50)]
    exact_norm = sum(np.sum(g[0] ** 2) for g in grads)
    assert abs(np.mean(norms) / exact_norm - 1) < 0.1


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: dense_project(np.ones((2, 3), np.float32), dim=0, key=0), "dim must be a positive int"),
        (lambda: dense_project({"a": np.ones((2, 3)), "b": np.ones((3, 3))}, dim=4, key=0), "same leading"),
        (lambda: dense_project(np.ones((2, 3), np.int32), dim=4, key=0), "floating"),
        (lambda: dense_project(np.full((2, 3), np.nan, np.float32), dim=4, key=0), "NaN"),
        (lambda: dense_project({}, dim=4, key=0), "no arrays"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_sharded_batch_projects_like_one_device():
    script = '''
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import json, jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxdpo.projection import dense_project
g = np.random.default_rng(0).normal(size=(8, 5000)).astype(np.float32)
mesh = Mesh(np.array(jax.devices()), ("n",))
sharded = jax.device_put(g, NamedSharding(mesh, PartitionSpec("n")))
one = np.asarray(dense_project(jax.device_put(g, jax.devices()[0]), dim=64, key=3))
many = dense_project(sharded, dim=64, key=3)
print(json.dumps({"devices": len(jax.devices()), "max_diff": float(np.abs(np.asarray(many) - one).max() / np.abs(one).max())}))
'''
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4 and result["max_diff"] < 1024 * F32_EPS  # relative to the largest feature
