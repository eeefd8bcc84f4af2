import json

import numpy as np
import pytest

from jaxdpo import embedded
from jaxdpo.models import load_reward_model
from jaxdpo.oracles import (
    HumanOracle,
    LabelsPending,
    preferences_from_scores,
    reward_model_oracle,
    synthetic_oracle,
    torch_reward_model_oracle,
)

PROMPTS = ["topic0 w01 w02 w03 :", "topic3 w04 w05 w06 :", "topic2 w07 w07 w07 :"]
A = [" w00 w01 w02 w03", " w10 w11 w12 <eos>", " w14"]
B = [" w04 w05 w06 w07", " w13 <eos>", " w15 w08 w09 w11"]


def test_deterministic_synthetic_oracle_follows_the_reward():
    prefs = synthetic_oracle(embedded.reward, mode="deterministic").label(PROMPTS, A, B, seed=0, request_id="r")
    expected_a = [embedded.reward(p, r) for p, r in zip(PROMPTS, A)]
    expected_b = [embedded.reward(p, r) for p, r in zip(PROMPTS, B)]
    np.testing.assert_allclose(prefs.scores_a, expected_a)
    np.testing.assert_allclose(prefs.scores_b, expected_b)
    np.testing.assert_array_equal(prefs.prefer_a, np.asarray(expected_a) >= np.asarray(expected_b))


def test_bradley_terry_frequencies_and_determinism():
    margins = np.array([-2.0, 0.0, 0.5, 3.0])
    draws = np.stack([preferences_from_scores(margins, np.zeros(4), mode="bradley_terry", seed=s).prefer_a for s in range(4000)])
    np.testing.assert_allclose(draws.mean(axis=0), 1 / (1 + np.exp(-margins)), atol=0.025)
    again = preferences_from_scores(margins, np.zeros(4), mode="bradley_terry", seed=3).prefer_a
    np.testing.assert_array_equal(again, draws[3])


def test_unknown_mode_and_length_mismatch():
    with pytest.raises(ValueError, match="mode"):
        synthetic_oracle(embedded.reward, mode="majority")
    with pytest.raises(ValueError, match="same length"):
        synthetic_oracle(embedded.reward).label(PROMPTS, A[:2], B, seed=0, request_id="r")


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
    got = jax_oracle.label(PROMPTS, A, B, seed=0, request_id="r")
    expected = torch_oracle.label(PROMPTS, A, B, seed=0, request_id="r")
    np.testing.assert_allclose(got.scores_a, expected.scores_a, atol=1e-4)
    np.testing.assert_allclose(got.scores_b, expected.scores_b, atol=1e-4)
    np.testing.assert_array_equal(got.prefer_a, expected.prefer_a)
    assert np.ptp(np.r_[got.scores_a, got.scores_b]) > 1e-3  # the scores are not all equal


def write_labels(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_human_round_trip(tmp_path):
    oracle = HumanOracle(tmp_path)
    with pytest.raises(LabelsPending, match="round-001.labels.jsonl"):
        oracle.label(PROMPTS, A, B, request_id="round-001")
    requests, labels = oracle.paths("round-001")
    rows = [json.loads(line) for line in requests.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS and [r["response_b"] for r in rows] == B
    write_labels(labels, [{"id": r["id"], "preferred": p} for r, p in zip(rows, "aba")])
    prefs = oracle.label(PROMPTS, A, B, request_id="round-001")
    np.testing.assert_array_equal(prefs.prefer_a, [True, False, True])


def test_bad_label_file_lists_every_offending_line(tmp_path):
    oracle = HumanOracle(tmp_path)
    with pytest.raises(LabelsPending):
        oracle.label(PROMPTS, A, B, request_id="r2")
    requests, labels = oracle.paths("r2")
    ids = [json.loads(line)["id"] for line in requests.read_text().splitlines()]
    write_labels(labels, [
        {"id": ids[0], "preferred": "a"},
        "{not json",
        {"id": "r9-00000", "preferred": "a"},
        {"id": ids[0], "preferred": "b"},
        {"id": ids[1], "preferred": "c"},
        {"preferred": "a"},
    ])
    before = labels.read_text()
    with pytest.raises(ValueError) as error:
        oracle.label(PROMPTS, A, B, request_id="r2")
    message = str(error.value)
    for expected in ["line 2: not valid JSON", "line 3: unknown id 'r9-00000'", "line 4: duplicate", "line 5: preferred",
                     "line 6: needs", f"missing labels for 2 ids: {ids[1]}, {ids[2]}"]:
        assert expected in message
    assert labels.read_text() == before  # nothing the annotators wrote is touched
