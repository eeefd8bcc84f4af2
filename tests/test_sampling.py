import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import jaxdpo
from jaxdpo.sampling import CANDIDATES, filter_logits, generation_program, row_keys, step_uniforms
from tests.draw_reference import inverse_cdf_reference
from tests.tiny import CONFIG, tiny_model, trained_lora

MAX_NEW = 6


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def lora(model):
    return trained_lora(model)


def left_padded(seed=0, batch=3, length=5):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, CONFIG.vocab_size, size=(batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    for i in range(batch):
        mask[i, : i % length] = 0
        ids[i, : i % length] = 0
    return ids, mask


def greedy_reference(model, lora, prompt, steps, eos=()):
    """Argmax decoding with a full forward pass over the unpadded prompt + tokens so far."""
    tokens = list(prompt)
    out = []
    for _ in range(steps):
        logits = model(jnp.asarray([tokens], jnp.int32), lora=lora)[0, -1]
        token = int(jnp.argmax(logits))
        out.append(token)
        tokens.append(token)
        if token in eos:
            break
    return out


def test_greedy_with_cache_equals_full_forward_argmax(model, lora):
    ids, mask = left_padded()
    result = jaxdpo.generate(model, ids, mask, lora=lora, max_new_tokens=MAX_NEW, temperature=0.0, key=jax.random.key(0))
    assert result.input_ids.shape == (3, 5 + MAX_NEW)
    for i in range(3):
        prompt = ids[i][mask[i] == 1].tolist()
        expected = greedy_reference(model, lora, prompt, MAX_NEW)
        np.testing.assert_array_equal(np.asarray(result.input_ids[i, 5:]), expected)
        np.testing.assert_array_equal(np.asarray(result.response_mask[i]), [0] * 5 + [1] * MAX_NEW)
        np.testing.assert_array_equal(np.asarray(result.attention_mask[i]), np.r_[mask[i], [1] * MAX_NEW])


def test_stops_at_any_eos_and_masks_after(model, lora):
    ids, mask = left_padded()
    greedy = jaxdpo.generate(model, ids, mask, lora=lora, max_new_tokens=MAX_NEW, temperature=0.0, key=jax.random.key(0))
    tokens = np.asarray(greedy.input_ids[:, 5:])
    eos = (int(tokens[0, 1]), int(tokens[1, 0]))  # row 0 ends at step 1, row 1 at step 0 (or earlier)
    result = jaxdpo.generate(
        model, ids, mask, lora=lora, max_new_tokens=MAX_NEW, temperature=0.0, eos_token_id=eos, key=jax.random.key(0)
    )
    for i in range(3):
        prompt = ids[i][mask[i] == 1].tolist()
        expected = greedy_reference(model, lora, prompt, MAX_NEW, eos=eos)
        n = len(expected)
        row = np.asarray(result.input_ids[i, 5:])
        np.testing.assert_array_equal(row[:n], expected)
        np.testing.assert_array_equal(row[n:], 0)
        np.testing.assert_array_equal(np.asarray(result.response_mask[i, 5:]), [1] * n + [0] * (MAX_NEW - n))
        np.testing.assert_array_equal(np.asarray(result.attention_mask[i, 5:]), [1] * n + [0] * (MAX_NEW - n))
    assert np.asarray(result.response_mask[0, 5:]).sum() <= 2


def test_samples_reproducible_and_laid_out_per_prompt(model, lora):
    ids, mask = left_padded()
    kwargs = dict(lora=lora, max_new_tokens=MAX_NEW, num_samples=4, top_k=5, top_p=0.9)
    a = jaxdpo.generate(model, ids, mask, key=jax.random.key(7), **kwargs)
    b = jaxdpo.generate(model, ids, mask, key=jax.random.key(7), **kwargs)
    c = jaxdpo.generate(model, ids, mask, key=jax.random.key(8), **kwargs)
    assert a.input_ids.shape == (12, 5 + MAX_NEW)
    np.testing.assert_array_equal(np.asarray(a.input_ids), np.asarray(b.input_ids))
    assert not np.array_equal(np.asarray(a.input_ids), np.asarray(c.input_ids))
    np.testing.assert_array_equal(np.asarray(a.input_ids[:, :5]), np.repeat(ids, 4, axis=0))
    assert len({tuple(r) for r in np.asarray(a.input_ids[:4, 5:]).tolist()}) > 1  # samples differ


def sorted_filter(logits, top_p, top_k):
    """The filter as jaxdpo had it before candidates (one full sort per row), with top_p = 1
    keeping the whole top-k set: the reference for `filter_logits` and `sampled_reference`."""
    vocab = logits.shape[-1]
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, jnp.broadcast_to(k - 1, logits.shape[:-1])[..., None], axis=-1)
    ordered = jnp.where(ordered >= kth, ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = ((mass_before < top_p) | (top_p >= 1)) & (ordered > -jnp.inf)
    cut = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= cut, logits, -jnp.inf)


forward = jax.jit(lambda model, lora, ids, mask: model(ids, attention_mask=mask, lora=lora))


def sampled_reference(model, lora, ids, mask, key, steps, num_samples, temperature, top_p, top_k, prompt_index):
    """The sampling loop without shared prefills or a cache: the prompts repeated `num_samples`
    times, each step a full forward pass over a buffer whose future tokens are masked, the filter
    by a full sort, and each row's token the float64 inverse CDF (`inverse_cdf_reference`) of its
    step's uniforms (`step_uniforms` of its `row_keys`)."""
    prompt = ids.shape[1]
    ids = np.pad(np.repeat(ids, num_samples, axis=0), ((0, 0), (0, steps)))
    mask = np.pad(np.repeat(mask, num_samples, axis=0), ((0, 0), (0, steps)))
    keys = row_keys(key, jnp.asarray(prompt_index), num_samples)
    for t in range(prompt, prompt + steps):
        logits = forward(model, lora, jnp.asarray(ids), jnp.asarray(mask))[:, t - 1]
        filtered = np.asarray(sorted_filter(logits / temperature, top_p, top_k))
        ids[:, t] = inverse_cdf_reference(filtered, np.asarray(step_uniforms(keys, t - prompt)))
        mask[:, t] = 1
    return ids[:, prompt:]


@pytest.mark.parametrize("top_p, top_k", [(1.0, 0), (0.8, 6)])
def test_sampled_tokens_are_the_inverse_cdf_of_each_rows_uniforms(model, lora, top_p, top_k):
    """One prefill per prompt, decoded as num_samples rows over the KV cache, draws the tokens of
    the reference loop: row (prompt i, sample j) from the uniforms of (key, prompt_index[i], j)."""
    ids, mask = left_padded()
    key, prompt_index = jax.random.key(11), np.array([7, 0, 3])
    result = jaxdpo.generate(
        model, ids, mask, lora=lora, max_new_tokens=MAX_NEW, num_samples=3, temperature=1.3, top_p=top_p, top_k=top_k, key=key,
        prompt_index=prompt_index,
    )
    expected = sampled_reference(model, lora, ids, mask, key, MAX_NEW, 3, 1.3, top_p, top_k, prompt_index)
    np.testing.assert_array_equal(np.asarray(result.input_ids[:, 5:]), expected)


def test_a_prompts_samples_do_not_depend_on_the_call(model, lora):
    """The same prompt with the same index gets the same samples in another position, beside other
    prompts or beside a padding copy of itself (chunked generation, meshes)."""
    ids, mask = left_padded()
    kwargs = dict(lora=lora, max_new_tokens=MAX_NEW, num_samples=2, key=jax.random.key(5))
    together = np.asarray(jaxdpo.generate(model, ids, mask, **kwargs).input_ids).reshape(3, 2, -1)
    order = np.array([2, 0, 0])  # prompt 2 first, prompt 0 twice (as a padding row)
    apart = np.asarray(jaxdpo.generate(model, ids[order], mask[order], prompt_index=order, **kwargs).input_ids).reshape(3, 2, -1)
    np.testing.assert_array_equal(apart, together[order])


def test_sampled_tokens_respect_top_k(model, lora):
    ids, mask = left_padded()
    result = jaxdpo.generate(model, ids, mask, lora=lora, max_new_tokens=1, top_k=1, num_samples=5, key=jax.random.key(1))
    greedy = jaxdpo.generate(model, ids, mask, lora=lora, max_new_tokens=1, temperature=0.0, key=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(result.input_ids[:, -1]), np.repeat(np.asarray(greedy.input_ids[:, -1]), 5))


def test_no_recompilation_across_rounds(model, lora):
    ids, mask = left_padded()
    kwargs = dict(max_new_tokens=MAX_NEW, num_samples=2, top_p=0.95)
    jaxdpo.generate(model, ids, mask, lora=lora, key=jax.random.key(0), **kwargs)
    before = generation_program._cache_size()
    for round_ in range(3):  # new adapter weights, keys, temperatures each "round"
        new_lora = jax.tree.map(lambda x: x * (1.0 + 0.1 * round_), lora)
        jaxdpo.generate(model, ids, mask, lora=new_lora, key=jax.random.key(round_), temperature=0.5 + round_, **kwargs)
    assert generation_program._cache_size() == before


def reference_filter(logits, top_p, top_k):
    """float64 NumPy: keep the top-k (ties kept), then the smallest descending prefix reaching top_p."""
    logits = np.asarray(logits, np.float64)
    keep = np.ones_like(logits, bool)
    if top_k > 0:
        kth = np.sort(logits)[::-1][min(top_k, logits.size) - 1]
        keep &= logits >= kth
    order = np.argsort(-logits, kind="stable")
    order = order[keep[order]]
    probs = np.exp(logits[order] - logits[order].max())
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    kept = order[before < top_p]
    cut = logits[kept].min()
    return keep & (logits >= cut)


@given(
    st.lists(st.integers(-8, 8), min_size=2, max_size=12),
    st.floats(0.05, 1.0),
    st.integers(0, 14),
)
def test_filter_logits_matches_reference(values, top_p, top_k):
    logits = np.asarray(values, np.float32) / 2.0  # integer halves: exact ties happen
    got = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits)[None], top_p=top_p, top_k=top_k)[0]))
    np.testing.assert_array_equal(got, reference_filter(logits, top_p, top_k))


def test_filter_logits_keeps_the_whole_top_k_set_at_top_p_1():
    """float32 cumulative mass reaches 1 before the last of these tokens; top_p = 1 must not cut."""
    kept = filter_logits(jnp.asarray([[5.0, -10.0, -12.0, -13.0]]), top_p=1.0, top_k=4)
    assert np.isfinite(np.asarray(kept)).all()


@pytest.mark.parametrize(
    "top_p, top_k",
    [(0.9, 0), (0.5, 40), (1.0, 40), (0.9, CANDIDATES + 50), (1.0, CANDIDATES + 50), (0.3, 1)],
)
@pytest.mark.parametrize("scale", [0.3, 3.0])  # flat (nucleus past the candidates) and peaked rows
def test_filter_logits_equals_the_full_sort(top_p, top_k, scale):
    """Rows wider than CANDIDATES, so both the candidate cut and the full-sort fallback run."""
    logits = scale * jax.random.normal(jax.random.key(int(10 * scale)), (6, 3 * CANDIDATES))
    logits = logits.at[0, :10].set(logits[0, 0])  # ties at the top
    got = np.isfinite(np.asarray(filter_logits(logits, top_p=top_p, top_k=top_k)))
    expected = np.isfinite(np.asarray(sorted_filter(logits, top_p, top_k)))
    np.testing.assert_array_equal(got, expected)


@pytest.mark.usefixtures("unchecked_shapes")
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(prompt_mask=np.ones((3, 4), np.int32)), "prompt_mask"),
        (dict(prompt_ids=np.zeros((3, 5), np.float32)), "integer"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(num_samples=0), "num_samples"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(prompt_mask=np.tile([[1, 1, 1, 1, 0]], (3, 1))), "left-padded"),
        (dict(prompt_mask=np.zeros((3, 5), np.int32)), "empty prompt"),
    ],
)
def test_bad_input(model, change, message):
    ids, mask = left_padded()
    kwargs = dict(prompt_ids=ids, prompt_mask=mask, max_new_tokens=2, key=jax.random.key(0)) | change
    with pytest.raises(ValueError, match=message):
        jaxdpo.generate(model, kwargs.pop("prompt_ids"), kwargs.pop("prompt_mask"), **kwargs)


def test_decode_weights_are_made_once_per_set_of_weights():
    """CPU's DecodeWeights copy is reused by every call while the model keeps its weights, and made
    anew when they are replaced (generation then follows the new weights)."""
    model, other = tiny_model(seed=3), tiny_model(seed=5)
    ids, mask = left_padded()
    kwargs = dict(max_new_tokens=MAX_NEW, temperature=0.0, key=jax.random.key(0))
    first = model.decode_weights()
    assert model.decode_weights() is first
    nnx.update(model, nnx.state(other))
    assert model.decode_weights() is not first
    np.testing.assert_array_equal(np.asarray(jaxdpo.generate(model, ids, mask, **kwargs).input_ids),
                                  np.asarray(jaxdpo.generate(other, ids, mask, **kwargs).input_ids))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_weights_read_in_place_decode_as_the_cpu_copy(model, lora, temperature):
    """Accelerators' path (the stacked weights read in place, `weights=None`) draws the tokens of
    CPU's (`DecodeWeights`)."""
    ids, mask = left_padded()
    args = (lora, ids, mask, jnp.arange(3), jax.random.key(3), jnp.float32(temperature), jnp.float32(1.0), jnp.int32(0))
    static = dict(num_samples=2, max_new_tokens=MAX_NEW, eos_ids=(), pad_id=0, filtered=False)
    copied = generation_program(model, model.decode_weights(), *args, **static)
    in_place = generation_program(model, None, *args, **static)
    np.testing.assert_array_equal(np.asarray(in_place.input_ids), np.asarray(copied.input_ids))


def test_generation_lowers_from_abstract_inputs_and_copies_no_weights():
    """The generation program lowers from abstract inputs (`jax.ShapeDtypeStruct`: no weights
    anywhere), as a memory plan does, both with the weights read in place and with CPU's
    `DecodeWeights`; with the latter (an argument, made once per model) its compiled temporaries
    stay far below the layer weights' bytes: the program itself copies no weights."""
    model = nnx.eval_shape(lambda: tiny_model(hidden_size=128, intermediate_size=256, num_heads=2, num_kv_heads=2, head_dim=64, num_layers=8))
    ids, index = jax.ShapeDtypeStruct((2, 4), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32)
    scalars = [jax.ShapeDtypeStruct((), dtype) for dtype in (jnp.float32, jnp.float32, jnp.int32)]
    static = dict(num_samples=2, max_new_tokens=4, eos_ids=(1,), pad_id=0, filtered=False)
    key = jax.eval_shape(lambda: jax.random.key(0))
    layer_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.layers))
    for weights in (None, jax.eval_shape(lambda model: model.decode_weights(), model)):
        compiled = generation_program.lower(model, weights, None, ids, ids, index, key, *scalars, **static).compile()
        if weights is not None:
            assert compiled.memory_analysis().temp_size_in_bytes < layer_bytes / 8
