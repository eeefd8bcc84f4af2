"""The candidate pool: every field a registered selector requires has a producer."""

import jax
import numpy as np
import pytest

from jaxdpo.experiment.pool import BASE_FIELDS, PRODUCERS
from jaxdpo.experiment.stages import triplets
from jaxdpo.selection import SELECTORS, SelectionPool, make_selector


def test_every_required_field_is_produced():
    for name in SELECTORS:
        missing = make_selector(name).requires - BASE_FIELDS - set(PRODUCERS)
        assert not missing, (name, missing)
    assert set(PRODUCERS) | BASE_FIELDS <= set(SelectionPool._fields)


def test_triplets_are_every_pair_of_each_prompts_responses():
    pairs = triplets(2, 3)
    np.testing.assert_array_equal(pairs, [[0, 1], [0, 2], [1, 2], [3, 4], [3, 5], [4, 5]])


def test_only_a_rule_that_splits_over_a_mesh_runs_on_a_placed_pool():
    """ActiveDPO's placed program is what a run on a mesh executes after `place_pairs` (a memory
    plan lowers it from shapes); a rule without one says so instead of running on one device."""
    assert make_selector("activedpo").placed is not None
    pool = SelectionPool(num_candidates=3, pairs=triplets(1, 3), margins=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="does not split its candidates over a mesh"):
        make_selector("random").on_placed(pool, 1, key=jax.random.key(0))
