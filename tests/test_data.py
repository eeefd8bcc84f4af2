import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from jaxdpo.data import (
    load_hh_rlhf,
    load_prompts,
    load_references,
    load_tldr,
    load_webgpt,
    split_dialogue,
    tldr_prompt,
    tokenize_prompts,
    tokenize_references,
)

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


@pytest.fixture(scope="module")
def hh():
    """The real HH-RLHF sample; only the tests that read it skip without it."""
    if not HH.exists():
        pytest.skip(f"the shared HH-RLHF file is not present ({HH})")
    return load_hh_rlhf(HH)


def test_hh_rlhf_parses_every_dialogue(hh):
    assert len(hh) == 2312
    assert set(hh.column_names) == {"prompt", "chosen", "rejected"}
    first = hh[0]
    assert first["prompt"].startswith("\n\nHuman: what are some pranks with a pen i can do?")
    assert first["prompt"].endswith("\n\nHuman: okay some of these do not have anything to do with pens\n\nAssistant:")
    assert first["chosen"].startswith("No, sorry!  All of these involve a pen")
    assert all(p.endswith("\n\nAssistant:") for p in hh["prompt"])
    assert sum(c != r for c, r in zip(hh["chosen"], hh["rejected"])) > 2000


def test_split_dialogue_errors():
    assert split_dialogue("\n\nHuman: hi\n\nAssistant: hello") == ("\n\nHuman: hi\n\nAssistant:", "hello")
    with pytest.raises(ValueError, match="not an HH-RLHF dialogue"):
        split_dialogue("just some text")


@pytest.fixture(scope="module")
def tokenizer(hh):
    """A word-level tokenizer trained in-process on the HH prompts."""
    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator(hh["prompt"][:500], trainers.WordLevelTrainer(vocab_size=2000, special_tokens=["<pad>", "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")


def test_tokenize_left_pads_and_reports_drops(tokenizer, hh):
    prompts = [*hh["prompt"][:20], ""]
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    limit = int(np.median(lengths[:20]))
    out = tokenize_prompts(tokenizer, prompts, max_tokens=limit)
    assert out.dropped_empty == (20,)
    assert set(out.dropped_too_long) == {i for i, n in enumerate(lengths[:20]) if n > limit}
    assert len(out.kept) + len(out.dropped_too_long) + 1 == 21
    for row, i in enumerate(out.kept):
        ids = tokenizer(prompts[i])["input_ids"]
        np.testing.assert_array_equal(out.input_ids[row, limit - len(ids) :], ids)
        assert out.attention_mask[row].sum() == len(ids) and out.attention_mask[row, -1] == 1
    assert f"dropped {len(out.dropped_too_long)} longer than {limit} tokens and 1 empty" in out.report()

    cut = tokenize_prompts(tokenizer, prompts[:20], max_tokens=limit, truncate=True)
    assert len(cut.kept) == 20 and set(cut.truncated) == set(out.dropped_too_long)
    longest = int(np.argmax(lengths[:20]))
    np.testing.assert_array_equal(cut.input_ids[longest], tokenizer(prompts[longest])["input_ids"][-limit:])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_tldr_schema(tmp_path):
    info = {"id": "t3", "post": "My cat sleeps all day.", "title": "Lazy cat", "subreddit": "cats"}
    rows = [
        {"info": info, "summaries": [{"text": " cat sleeps"}, {"text": " a dog"}], "choice": 1},
        {"info": info, "summaries": [{"text": " sleepy cat"}, {"text": " a dog"}], "choice": 0},
    ]
    data = load_tldr(write_jsonl(tmp_path / "tldr.jsonl", rows))
    assert data[0]["prompt"] == "SUBREDDIT: r/cats\nTITLE: Lazy cat\nPOST: My cat sleeps all day.\nTL;DR:" == tldr_prompt(info)
    assert (data[0]["chosen"], data[0]["rejected"]) == (" a dog", " cat sleeps")
    assert (data[1]["chosen"], data[1]["rejected"]) == (" sleepy cat", " a dog")
    assert load_prompts("tldr", tmp_path / "tldr.jsonl") == [tldr_prompt(info)]  # distinct prompts


def test_webgpt_schema_drops_ties(tmp_path):
    rows = [
        {"question": {"full_text": "Why is the sky blue?"}, "answer_0": "Rayleigh", "answer_1": "Magic", "score_0": 1.0, "score_1": -1.0},
        {"question": {"full_text": "Tie?"}, "answer_0": "x", "answer_1": "y", "score_0": 0.0, "score_1": 0.0},
        {"question": {"full_text": "2+2?"}, "answer_0": "5", "answer_1": "4", "score_0": -0.5, "score_1": 0.5},
    ]
    data = load_webgpt(write_jsonl(tmp_path / "webgpt.jsonl", rows))
    assert data["prompt"] == ["Why is the sky blue?", "2+2?"]
    assert data["chosen"] == ["Rayleigh", "4"]


def test_jsonl_prompts_and_errors(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "a"}, {"text": "b"}, {"text": "a"}])
    with pytest.raises(ValueError, match="no 'prompt' field"):
        load_prompts("jsonl", path)
    with pytest.raises(ValueError, match="unknown data source 'reddit'"):
        load_prompts("reddit", path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_prompts("tldr", tmp_path / "missing.jsonl")
    write_jsonl(tmp_path / "q.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "a"}])
    assert load_prompts("jsonl", tmp_path / "q.jsonl") == ["a", "b"]


def test_loading_prints_no_progress_bars_and_leaves_them_as_they_were(tmp_path, capfd, monkeypatch):
    from datasets.utils import are_progress_bars_disabled

    monkeypatch.delenv("HF_DATASETS_DISABLE_PROGRESS_BARS", raising=False)
    write_jsonl(tmp_path / "fresh.jsonl", [{"prompt": f"p{i}"} for i in range(3)])  # never cached: datasets generates its split
    assert load_prompts("jsonl", tmp_path / "fresh.jsonl") == ["p0", "p1", "p2"]
    printed = capfd.readouterr()
    assert "Generating train split" not in printed.err + printed.out
    assert not are_progress_bars_disabled()  # the user's own datasets calls keep their bars


def test_references_are_each_prompts_first_chosen_response(tmp_path):
    info = {"id": "t3", "post": "My cat sleeps all day.", "title": "Lazy cat", "subreddit": "cats"}
    rows = [
        {"info": info, "summaries": [{"text": " cat sleeps"}, {"text": " a dog"}], "choice": 1},
        {"info": info, "summaries": [{"text": " sleepy cat"}, {"text": " a dog"}], "choice": 0},
    ]
    assert load_references("tldr", write_jsonl(tmp_path / "tldr.jsonl", rows)) == {tldr_prompt(info): " a dog"}
    plain = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    assert load_references("jsonl", plain) == {"a": None, "b": None}
    answered = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "a", "chosen": "yes"}, {"prompt": "a", "chosen": "no"}])
    assert load_references("jsonl", answered) == {"a": "yes"}


def test_reference_rows_are_laid_out_as_generated_responses():
    from jaxdpo import embedded

    tokenizer = embedded.build_tokenizer()
    prompts = tokenize_prompts(tokenizer, ["topic1 w00 :", "topic2 w01 w02 w03 :", "topic0 w04 :"], max_tokens=5)
    rows = tokenize_references(tokenizer, prompts.input_ids, prompts.attention_mask, ["w05 w06", None, "w07 w08 w09 w10"], max_new_tokens=3)
    vocab = np.asarray(embedded.VOCAB)
    assert rows.input_ids.shape == (2, 8)  # the prompt without a response is left out
    np.testing.assert_array_equal(rows.input_ids[:, :5], prompts.input_ids[[0, 2]])
    assert list(vocab[rows.input_ids[0, 5:]]) == ["w05", "w06", "<eos>"]  # it fits: the end token follows
    assert list(vocab[rows.input_ids[1, 5:]]) == ["w07", "w08", "w09"]  # cut at max_new_tokens: no end token
    np.testing.assert_array_equal(rows.response_mask[:, 5:], 1)
    np.testing.assert_array_equal(rows.attention_mask, np.concatenate([prompts.attention_mask[[0, 2]], np.ones((2, 3), int)], axis=1))
    assert tokenize_references(tokenizer, prompts.input_ids, prompts.attention_mask, [None, "", None], max_new_tokens=3) is None


GOOD = '{"prompt": "first"}\n'


@pytest.mark.parametrize(
    "name, text, problem",
    [
        ("not-json.jsonl", GOOD + "not json\n" + GOOD, r"line 2 is not valid JSON: Expecting value \(column 1\)"),
        ("truncated.jsonl", GOOD + GOOD + '{"prompt": "cut sh', r"line 3 is not valid JSON: Unterminated string"),
        ("no-prompt.jsonl", GOOD + '{"text": "no prompt"}\n', r"line 2 has no 'prompt' field"),
        ("number.jsonl", '{"prompt": 7}\n{"prompt": 8}\n', r"line 1 has 'prompt' = 7, not a string"),
        ("list.jsonl", GOOD + '["a", "b"]\n', r"line 2 is not a JSON object"),
        ("empty.jsonl", "", r"is empty"),
        ("blank.jsonl", "\n  \n", r"is empty"),
        ("array.json", '[{"prompt": "a"},\n {"prompt" "b"}]\n', r"line 2 is not valid JSON: Expecting ':' delimiter"),
    ],
)
def test_a_bad_prompt_file_is_named_with_its_line(tmp_path, name, text, problem):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=f"^{path}:? {problem}") as error:  # one line, the file and its line
        load_prompts("jsonl", path)
    assert "\n" not in str(error.value)


def test_bad_files_of_hub_schemas_and_compressed_files_are_named_too(tmp_path):
    rows = write_jsonl(tmp_path / "tldr.jsonl", [{"info": {"post": "p", "title": "t", "subreddit": "s"}, "summaries": [], "choice": 0}, {"info": None}])
    with pytest.raises(ValueError, match=f"^{rows}: line 2 has no 'info' field$"):
        load_prompts("tldr", rows)
    packed = tmp_path / "hh.jsonl.gz"
    packed.write_bytes(gzip.compress(b'{"chosen": "x", "rejected": "y"}\n{"chosen": \n'))
    with pytest.raises(ValueError, match=f"^{packed}: line 2 is not valid JSON"):
        load_prompts("hh_rlhf", packed)
