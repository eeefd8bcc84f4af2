"""Sequence-classification reward models against transformers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxdpo.models import load_reward_model
from tests.models.conftest import VOCAB, build
from tests.tolerance import assert_close

PAD = 0


@pytest.mark.parametrize("family", ["llama", "gemma", "gemma2", "qwen3"])
def test_scores_match_transformers(tmp_path, family):
    torch_model = build(family, head="SequenceClassification", num_labels=1, pad_token_id=PAD)
    torch_model.save_pretrained(tmp_path)
    rm = load_reward_model(tmp_path)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, size=(3, 6)).astype(np.int32)
    ids[1, 4:] = PAD  # right padding, as transformers expects
    ids[2, 2:] = PAD
    mask = (ids != PAD).astype(np.int32)
    with torch.no_grad():
        expected = torch_model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
    score = jax.jit(lambda rm, ids, mask: rm(ids, attention_mask=mask))
    assert_close(score(rm, ids, mask), expected, ulps=1024)  # vs torch's float32 order
    # left padding gives the score of the unpadded sequence
    left = np.full((1, 6), PAD, np.int32)
    left[0, 2:] = ids[1, :4]
    left_mask = (np.arange(6) >= 2).astype(np.int32)[None]
    alone = rm(jnp.asarray(ids[1:2, :4]))
    assert_close(rm(jnp.asarray(left), attention_mask=jnp.asarray(left_mask)), alone, ulps=256)


def test_more_than_one_label_is_rejected(tmp_path):
    build("llama", head="SequenceClassification", num_labels=2, pad_token_id=PAD).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="exactly one label"):
        load_reward_model(tmp_path)
