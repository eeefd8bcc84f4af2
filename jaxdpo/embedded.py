"""The embedded default task: small enough to run ActiveDPO end to end on a laptop CPU.

"Topic words". A prompt names one of `TOPICS` topics and a few context words, then ":"; a response
is 4-8 content words and an end token. Each topic has a hidden taste: a fixed value v[topic, word]
~ N(0, 1) per content word (seeded by `TASK_SEED`, the same everywhere). The oracle's reward is the
mean value of the response's words under the prompt's topic, r ∈ about [-2, 2].

The SFT data answer each topic in its own *style*: words drawn from a fixed per-topic distribution
(softmax of N(0, 1) logits, drawn independently of the taste). So π_SFT speaks the task's format,
tells the topics apart and already gives every word its own direction in output space — what DPO
needs to re-weight words per topic — while its reward starts near 0, because style and taste are
unrelated. (With uniformly random SFT answers the words stay indistinguishable in output space, and
DPO can only raise the reward by also raising prompt-only tokens: it lowered the reward instead.)

A second task, "redundant" (`TASKS`; design in docs/design.md), keeps all of this but draws
prompts from `TEMPLATES_PER_TOPIC` fixed templates per topic (one context word varied with
probability `VARY_RATE`) and answers with near-copies of `STOCK_ANSWERS` fixed answers per topic
(each word replaced from the topic's style with probability `EDIT_RATE`), so a round's candidate
pairs come in clusters of near-duplicates.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from jaxdpo import interrupts
from jaxdpo.models import Decoder, DecoderConfig
from jaxdpo.rewards import sequence_logprobs

TASK_SEED = 20250525
TOPICS = 4
WORDS = 16
CONTEXT_WORDS = 3
MIN_RESPONSE_WORDS, MAX_RESPONSE_WORDS = 4, 8
TASKS = ("topics", "redundant")
TEMPLATES_PER_TOPIC, VARY_RATE = 2, 0.5
STOCK_ANSWERS, EDIT_RATE = 3, 0.2
PAD, EOS, BOS, SEPARATOR = "<pad>", "<eos>", "<bos>", ":"

TOPIC_TOKENS = tuple(f"topic{k}" for k in range(TOPICS))
WORD_TOKENS = tuple(f"w{j:02d}" for j in range(WORDS))
VOCAB = (PAD, EOS, BOS, SEPARATOR, *TOPIC_TOKENS, *WORD_TOKENS)
PROMPT_TOKENS = 1 + CONTEXT_WORDS + 1
MAX_NEW_TOKENS = MAX_RESPONSE_WORDS + 1  # the words and the end token

MODEL_CONFIG = DecoderConfig(
    family="llama", vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16,
)


def word_values() -> np.ndarray:
    """The hidden taste v [TOPICS, WORDS] (fixed by TASK_SEED)."""
    return np.random.default_rng(TASK_SEED).normal(size=(TOPICS, WORDS))


_VALUES = word_values()
_WORD_INDEX = {w: j for j, w in enumerate(WORD_TOKENS)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `VOCAB` (whitespace-separated tokens; no training needed)."""
    core = Tokenizer(models.WordLevel({token: i for i, token in enumerate(VOCAB)}, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, bos_token=BOS)


def sample_prompts(rng: np.random.Generator, count: int, task: str = "topics") -> list[str]:
    """`count` prompts "topicK wAA wBB wCC :": uniformly random topic and context words ("topics"),
    or a uniformly drawn template with one context word redrawn with probability `VARY_RATE`
    ("redundant")."""
    if _check_task(task) == "redundant":
        rows = prompt_templates()[rng.integers(0, TOPICS * TEMPLATES_PER_TOPIC, size=count)]
        varied = np.flatnonzero(rng.random(count) < VARY_RATE)
        rows[varied, rng.integers(1, 1 + CONTEXT_WORDS, size=len(varied))] = rng.integers(0, WORDS, size=len(varied))
    else:
        rows = np.column_stack([rng.integers(0, TOPICS, size=count), rng.integers(0, WORDS, size=(count, CONTEXT_WORDS))])
    return [" ".join([TOPIC_TOKENS[row[0]], *(WORD_TOKENS[j] for j in row[1:]), SEPARATOR]) for row in rows]


def prompt_templates() -> np.ndarray:
    """The redundant task's templates `[TOPICS · TEMPLATES_PER_TOPIC, 1 + CONTEXT_WORDS]`: topic,
    then context word indices (fixed by TASK_SEED)."""
    topics = np.repeat(np.arange(TOPICS), TEMPLATES_PER_TOPIC)
    words = np.random.default_rng([TASK_SEED, 2]).integers(0, WORDS, size=(len(topics), CONTEXT_WORDS))
    return np.column_stack([topics, words])


def response_style() -> np.ndarray:
    """The SFT data's word distribution per topic [TOPICS, WORDS] (fixed, independent of the taste)."""
    logits = np.random.default_rng([TASK_SEED, 1]).normal(size=(TOPICS, WORDS))
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


_STYLE = response_style()


def stock_answers() -> list[list[np.ndarray]]:
    """The redundant task's `STOCK_ANSWERS` answers per topic: word indices, 4-8 words drawn from
    the topic's style (fixed by TASK_SEED)."""
    rng = np.random.default_rng([TASK_SEED, 3])
    lengths = rng.integers(MIN_RESPONSE_WORDS, MAX_RESPONSE_WORDS + 1, size=(TOPICS, STOCK_ANSWERS))
    return [[rng.choice(WORDS, size=n, p=_STYLE[topic]) for n in lengths[topic]] for topic in range(TOPICS)]


_STOCK = stock_answers()


def sample_responses(rng: np.random.Generator, prompts: list[str], task: str = "topics") -> list[str]:
    """SFT answers to `prompts` (the task's reference generator): 4-8 content words drawn from the
    style of each prompt's topic ("topics"), or one of the topic's stock answers with each word
    redrawn from that style with probability `EDIT_RATE` ("redundant")."""
    topics = [prompt_topic(prompt) for prompt in prompts]
    if _check_task(task) == "redundant":
        answers = []
        for topic in topics:
            words = _STOCK[topic][rng.integers(0, STOCK_ANSWERS)].copy()
            edited = np.flatnonzero(rng.random(len(words)) < EDIT_RATE)
            words[edited] = rng.choice(WORDS, size=len(edited), p=_STYLE[topic])
            answers.append(words)
    else:
        lengths = rng.integers(MIN_RESPONSE_WORDS, MAX_RESPONSE_WORDS + 1, size=len(prompts))
        answers = [rng.choice(WORDS, size=n, p=_STYLE[topic]) for topic, n in zip(topics, lengths)]
    return [" ".join(WORD_TOKENS[j] for j in words) for words in answers]


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown embedded task {task!r}; known tasks: {', '.join(TASKS)}")
    return task


def prompt_topic(prompt: str) -> int:
    first = prompt.split()[0] if prompt.split() else ""
    if first not in TOPIC_TOKENS:
        raise ValueError(f"not a prompt of the embedded task (no topic token first): {prompt!r}")
    return TOPIC_TOKENS.index(first)


def reward(prompt: str, response: str) -> float:
    """The oracle's reward: mean v[topic, word] over the response's content words. Anything that is
    not a content word (a stray topic token, ':', a missing end) counts as a word of value -2, and
    an empty response scores -2, so the reward cannot be gamed by degenerate text."""
    values = _VALUES[prompt_topic(prompt)]
    tokens = [t for t in response.replace(EOS, " ").split() if t != PAD]
    if not tokens:
        return -2.0
    return float(np.mean([values[_WORD_INDEX[t]] if t in _WORD_INDEX else -2.0 for t in tokens]))


def sft_batch(rng: np.random.Generator, count: int, task: str = "topics") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, response_mask, attention_mask) of `count` SFT examples of `task`: prompt, the
    task's answer (`sample_responses`), the end token; right-padded to PROMPT_TOKENS + MAX_NEW_TOKENS."""
    index = {token: i for i, token in enumerate(VOCAB)}
    length = PROMPT_TOKENS + MAX_NEW_TOKENS
    ids = np.zeros((count, length), np.int32)
    response = np.zeros_like(ids)
    prompts = sample_prompts(rng, count, task)
    for row, (prompt, answer) in enumerate(zip(prompts, sample_responses(rng, prompts, task))):
        tokens = [index[t] for t in (*prompt.split(), *answer.split(), EOS)]
        ids[row, : len(tokens)] = tokens
        response[row, PROMPT_TOKENS : len(tokens)] = 1
    attention = (np.arange(length) < (PROMPT_TOKENS + response.sum(axis=1))[:, None]).astype(np.int32)
    return ids, response, attention


def train_sft(
    *, task: str = "topics", seed: int = TASK_SEED, steps: int = 300, batch_size: int = 64, learning_rate: float = 3e-3
) -> Decoder:
    """The embedded task's initial policy π_SFT: `MODEL_CONFIG` trained from scratch (all weights,
    Adam) to imitate `task`'s SFT responses, so it answers in the task's format and style and its
    reward starts near 0 (paper: SFT before DPO)."""
    model = Decoder(MODEL_CONFIG, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    optimizer = optax.adam(learning_rate)

    @jax.jit
    def step(params, opt_state, ids, response, attention):
        def loss(params):
            logprobs = sequence_logprobs(nnx.merge(graphdef, params), None, ids, response, attention_mask=attention)
            return -logprobs.sum() / response.sum()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    rng = np.random.default_rng(seed)
    opt_state = optimizer.init(params)
    for _ in range(steps):
        interrupts.check()  # a safe point: Ctrl-C stops the training between steps
        params, opt_state, _ = step(params, opt_state, *sft_batch(rng, batch_size, task))
    return nnx.merge(graphdef, params)
