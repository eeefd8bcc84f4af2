"""The embedded task: SFT data in the task's format and per-topic style, and a reward DPO raises."""

import numpy as np
import pytest

from jaxdpo import embedded
from jaxdpo import experiment as loop
from jaxdpo.config import config_from_dict


def test_sft_data_format():
    ids, response, attention = embedded.sft_batch(np.random.default_rng(0), 32)
    vocab = np.asarray(embedded.VOCAB)
    words = set(embedded.WORD_TOKENS)
    for row, mask, valid in zip(ids, response, attention):
        prompt = vocab[row[: embedded.PROMPT_TOKENS]]
        assert prompt[0] in embedded.TOPIC_TOKENS and prompt[-1] == embedded.SEPARATOR
        answer = vocab[row[mask == 1]]
        assert answer[-1] == embedded.EOS and set(answer[:-1]) <= words
        assert embedded.MIN_RESPONSE_WORDS <= len(answer) - 1 <= embedded.MAX_RESPONSE_WORDS
        assert valid.sum() == embedded.PROMPT_TOKENS + len(answer)


def test_sft_responses_follow_the_topic_style():
    style = embedded.response_style()
    np.testing.assert_allclose(style.sum(axis=1), 1.0)
    rng = np.random.default_rng(1)
    prompts = embedded.sample_prompts(rng, 3000)
    counts = np.zeros_like(style)
    for prompt, answer in zip(prompts, embedded.sample_responses(rng, prompts)):
        for word in answer.split():
            counts[embedded.prompt_topic(prompt), embedded.WORD_TOKENS.index(word)] += 1
    frequencies = counts / counts.sum(axis=1, keepdims=True)
    assert np.abs(frequencies - style).max() < 0.03
    # the style is unrelated to the taste the oracle rewards: SFT answers score about 0 on average
    expected_reward = (style * embedded.word_values()).sum(axis=1)
    assert np.abs(expected_reward).mean() < 0.5


def test_redundant_prompts_are_templates_with_at_most_one_word_changed():
    rows = embedded.prompt_templates()
    assert rows.shape == (embedded.TOPICS * embedded.TEMPLATES_PER_TOPIC, 1 + embedded.CONTEXT_WORDS)
    prompts = embedded.sample_prompts(np.random.default_rng(0), 2000, "redundant")
    changed = []
    for prompt in prompts:
        words = prompt.split()
        topic, context = embedded.TOPIC_TOKENS.index(words[0]), [embedded.WORD_TOKENS.index(w) for w in words[1:-1]]
        distances = [np.sum(row[1:] != context) for row in rows if row[0] == topic]
        changed.append(min(distances))
    assert max(changed) <= 1
    assert np.mean(np.asarray(changed) == 0) == pytest.approx(0.5 + 0.5 / embedded.WORDS, abs=0.03)  # redrawn to itself 1/16 of the time


def test_redundant_answers_are_near_copies_of_stock_answers():
    rng = np.random.default_rng(1)
    prompts = embedded.sample_prompts(rng, 2000, "redundant")
    stock = embedded.stock_answers()
    edits = []
    for prompt, answer in zip(prompts, embedded.sample_responses(rng, prompts, "redundant")):
        words = np.asarray([embedded.WORD_TOKENS.index(w) for w in answer.split()])
        edits.append(min(np.sum(s != words) if len(s) == len(words) else len(words) for s in stock[embedded.prompt_topic(prompt)]))
    # each word is redrawn with probability 0.2 (and may come back unchanged): mostly 0-2 words differ
    assert np.mean(np.asarray(edits) <= 2) > 0.85 and max(edits) <= embedded.MAX_RESPONSE_WORDS
    ids, response, attention = embedded.sft_batch(np.random.default_rng(2), 8, "redundant")
    assert ids.shape == (8, embedded.PROMPT_TOKENS + embedded.MAX_NEW_TOKENS) and (attention >= response).all()
    with pytest.raises(ValueError, match="unknown embedded task 'templates'"):
        embedded.sample_prompts(rng, 1, "templates")


def test_the_topics_task_is_unchanged_by_the_second_task():
    """The default task's prompts and answers draw from the generator exactly as before the second task."""
    rng = np.random.default_rng(0)
    topics, context = rng.integers(0, embedded.TOPICS, size=3), rng.integers(0, embedded.WORDS, size=(3, embedded.CONTEXT_WORDS))
    expected = [" ".join([embedded.TOPIC_TOKENS[k], *(embedded.WORD_TOKENS[j] for j in row), ":"]) for k, row in zip(topics, context)]
    assert embedded.sample_prompts(np.random.default_rng(0), 3) == expected


def test_reward_of_degenerate_responses():
    prompt = "topic1 w00 w01 w02 :"
    values = embedded.word_values()[1]
    assert embedded.reward(prompt, "w03 w04 <eos>") == pytest.approx((values[3] + values[4]) / 2)
    assert embedded.reward(prompt, "<eos>") == -2.0
    assert embedded.reward(prompt, "w03 topic2 <eos>") == pytest.approx((values[3] - 2.0) / 2)
    with pytest.raises(ValueError, match="topic"):
        embedded.reward("w00 :", "w03 <eos>")


@pytest.mark.slow
def test_dpo_raises_the_oracle_reward(tmp_path):
    """The point of the task: DPO on 96 labels of random pairs lifts the held-out reward well
    beyond its standard error (about 0.04 here), and beats the SFT model head to head."""
    config = config_from_dict({
        "run": {"methods": ["random"], "seeds": [0], "rounds": 2},
        "selection": {"batch_size": 48},
    })
    rows = loop.run(config, tmp_path / "run")
    start, end = rows[0], rows[-1]
    assert end["labels"] == 96
    assert end["eval_reward"] - start["eval_reward"] > 0.15
    assert end["win_rate"] > 0.6
