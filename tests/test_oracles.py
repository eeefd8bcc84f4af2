import json
import sys

import numpy as np
import pytest

from jaxdpo import embedded
from jaxdpo.errors import UserError
from jaxdpo.models import load_reward_model
from jaxdpo.oracles import (
    HumanOracle,
    LabelFileError,
    LabelsPending,
    PairRequest,
    preferences_from_scores,
    reward_model_oracle,
    synthetic_oracle,
    torch_reward_model_oracle,
)
from tests.tolerance import assert_close

PROMPTS = ["topic0 w01 w02 w03 :", "topic3 w04 w05 w06 :", "topic2 w07 w07 w07 :"]
A = [" w00 w01 w02 w03", " w10 w11 w12 <eos>", " w14"]
B = [" w04 w05 w06 w07", " w13 <eos>", " w15 w08 w09 w11"]


def requests(track="t-seed0", round_=1, prompts=PROMPTS, a=A, b=B):
    return [PairRequest(f"{track}-round{round_:03d}-pick{i:03d}", track, round_, p, x, y) for i, (p, x, y) in enumerate(zip(prompts, a, b))]


def test_deterministic_synthetic_oracle_follows_the_reward():
    prefs = synthetic_oracle(embedded.reward, mode="deterministic").label(requests(), seed=0)
    expected_a = [embedded.reward(p, r) for p, r in zip(PROMPTS, A)]
    expected_b = [embedded.reward(p, r) for p, r in zip(PROMPTS, B)]
    np.testing.assert_allclose(prefs.scores_a, expected_a)
    np.testing.assert_allclose(prefs.scores_b, expected_b)
    np.testing.assert_array_equal(prefs.prefer_a, np.asarray(expected_a) >= np.asarray(expected_b))


def test_bradley_terry_frequencies_and_determinism():
    margins = np.array([-2.0, 0.0, 0.5, 3.0])
    ids = ["p0", "p1", "p2", "p3"]
    draws = np.stack([preferences_from_scores(margins, np.zeros(4), mode="bradley_terry", seed=s, ids=ids).prefer_a for s in range(4000)])
    np.testing.assert_allclose(draws.mean(axis=0), 1 / (1 + np.exp(-margins)), atol=0.025)
    again = preferences_from_scores(margins, np.zeros(4), mode="bradley_terry", seed=3, ids=ids).prefer_a
    np.testing.assert_array_equal(again, draws[3])
    # a pair's label does not depend on the other pairs asked with it (a resume re-asks a subset)
    alone = preferences_from_scores(margins[2:], np.zeros(2), mode="bradley_terry", seed=3, ids=ids[2:]).prefer_a
    np.testing.assert_array_equal(alone, draws[3, 2:])


@pytest.mark.usefixtures("unchecked_shapes")
def test_unknown_mode_and_length_mismatch():
    with pytest.raises(ValueError, match="mode"):
        synthetic_oracle(embedded.reward, mode="majority")
    with pytest.raises(ValueError, match="distinct"):
        synthetic_oracle(embedded.reward).label([*requests(), requests()[0]], seed=0)


@pytest.fixture(scope="module")
def reward_checkpoint(tmp_path_factory):
    """A tiny Llama reward model over the embedded task's vocabulary, saved with its tokenizer."""
    torch = pytest.importorskip("torch")
    import transformers

    tokenizer = embedded.build_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(embedded.VOCAB), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    folder = tmp_path_factory.mktemp("rm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer


def test_reward_model_oracle_matches_torch_adapter(reward_checkpoint):
    folder, tokenizer = reward_checkpoint
    jax_oracle = reward_model_oracle(load_reward_model(folder), tokenizer, mode="deterministic", max_length=12, batch_size=2)
    torch_oracle = torch_reward_model_oracle(str(folder), mode="deterministic")
    got = jax_oracle.label(requests(), seed=0)
    expected = torch_oracle.label(requests(), seed=0)
    assert_close(got.scores_a, expected.scores_a, ulps=1024)  # vs torch's float32 order
    assert_close(got.scores_b, expected.scores_b, ulps=1024)
    np.testing.assert_array_equal(got.prefer_a, expected.prefer_a)
    assert np.ptp(np.r_[got.scores_a, got.scores_b]) > 1e-3  # the scores are not all equal


def write_labels(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_human_batch_covers_every_waiting_track_and_round_trips(tmp_path):
    oracle = HumanOracle(tmp_path)
    first, second = requests("activedpo-seed0"), requests("random-seed0")[:2]
    for batch in (first, second):
        with pytest.raises(LabelsPending):
            oracle.label(batch)
    message = oracle.submit_pending()
    assert "5 pairs in" in message and "batch-001.requests.jsonl" in message and "--resume" in message
    [(request_file, answer_file)] = oracle.batches()
    assert [r["id"] for r in map(json.loads, request_file.read_text().splitlines())] == [r.id for r in first + second]
    # answering some: the others stay pending, nothing is requested twice
    write_labels(answer_file, [{"id": first[0].id, "preferred": "b"}, {"id": first[1].id, "preferred": "tie"}])
    with pytest.raises(LabelsPending):
        oracle.label(first)
    assert "3 pairs in" in oracle.submit_pending() and len(oracle.batches()) == 1
    write_labels(answer_file, [
        {"id": first[0].id, "preferred": "a"},
        {"id": first[0].id, "undo": True},  # withdrawn, then answered again
        {"id": first[0].id, "preferred": "b", "left": "b"},
        {"id": first[1].id, "preferred": "tie"},
        {"id": first[2].id, "preferred": "skip"},
        {"id": second[0].id, "preferred": "a"},
        {"id": second[1].id, "preferred": "b"},
    ])
    prefs = oracle.label(first)
    np.testing.assert_array_equal(prefs.prefer_a, [False, False, False])
    np.testing.assert_array_equal(prefs.valid, [True, False, False])
    np.testing.assert_array_equal(oracle.label(second).prefer_a, [True, False])
    answer_file.write_text(answer_file.read_text() + '{"id": "unfinished')  # a write in progress is ignored
    np.testing.assert_array_equal(oracle.label(second).prefer_a, [True, False])


def test_bad_label_file_lists_every_offending_line(tmp_path):
    oracle = HumanOracle(tmp_path)
    batch = requests()
    with pytest.raises(LabelsPending):
        oracle.label(batch)
    oracle.submit_pending()
    [(_, labels)] = oracle.batches()
    write_labels(labels, [
        {"id": batch[0].id, "preferred": "a"},
        "{not json",
        {"id": "r9-00000", "preferred": "a"},
        {"id": [batch[1].id], "preferred": "a"},
        {"id": batch[1].id, "preferred": "c"},
        {"preferred": "a"},
    ])
    before = labels.read_text()
    with pytest.raises(LabelFileError) as error:
        oracle.label(batch)
    message = str(error.value)
    for expected in ["line 2: not valid JSON", "line 3: unknown id 'r9-00000'", 'line 4: needs an object with a string "id"',
                     'line 5: "preferred" must be one of', 'line 6: needs']:
        assert expected in message
    assert labels.read_text() == before  # nothing the annotators wrote is touched


def test_torch_reward_model_without_torch_is_one_line_naming_the_key(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(UserError, match=r"oracle.kind = 'torch_reward_model' needs torch.*pip install torch"):
        torch_reward_model_oracle(str(tmp_path))
