"""The candidate pool: every field a registered selector requires has a producer."""

import numpy as np

from jaxdpo.experiment.pool import BASE_FIELDS, PRODUCERS, triplets
from jaxdpo.selection import SELECTORS, SelectionPool, make_selector


def test_every_required_field_is_produced():
    for name in SELECTORS:
        missing = make_selector(name).requires - BASE_FIELDS - set(PRODUCERS)
        assert not missing, (name, missing)
    assert set(PRODUCERS) | BASE_FIELDS <= set(SelectionPool._fields)


def test_triplets_are_every_pair_of_each_prompts_responses():
    pairs = triplets(2, 3)
    np.testing.assert_array_equal(pairs, [[0, 1], [0, 2], [1, 2], [3, 4], [3, 5], [4, 5]])
