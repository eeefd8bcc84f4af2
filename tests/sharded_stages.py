"""Run in a subprocess with 8 host CPU devices: every stage on meshes 8×1, 4×2 and 2×4 (data ×
model) equals the one-device run and parameters really are split (whole runs on meshes:
`mesh_invariance.py`). Prints one JSON object."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from tiny import sequences, tiny_model, trained_lora  # noqa: E402

from jaxdpo import select_batch, sharding  # noqa: E402
from jaxdpo.dpo import DpoTrainer, batched_logprobs  # noqa: E402
from jaxdpo.features import gradient_features  # noqa: E402
from jaxdpo.sampling import generate  # noqa: E402
from jaxdpo.sequences import Sequences  # noqa: E402


def stages(model, lora, data: Sequences, mesh):
    """Every stage's output on `mesh` (None: one device)."""
    rows = sharding.put_rows(data, mesh)
    prompts = sharding.put_rows((data.input_ids[:, :5], np.ones((8, 5), np.int32)), mesh)
    tokens = generate(model, *prompts, lora=lora, max_new_tokens=4, temperature=0.0, key=jax.random.key(0)).input_ids
    logprobs = batched_logprobs(model, lora, data, chunk_size=8, mesh=mesh)
    features = gradient_features(model, lora, rows.input_ids, rows.response_mask, attention_mask=rows.attention_mask,
                                 beta=0.1, dim=64, seed=0, method="factored", chunk_size=8)
    phi = np.asarray(features)[:, None] - np.asarray(features)[None]  # 64 candidate differences
    picks = select_batch(sharding.put_candidates(phi.reshape(64, -1), mesh), 6).indices
    trainer = DpoTrainer(beta=0.1, learning_rate=1e-2, epochs=3, batch_size=4)
    state, losses = trainer.train(model, trainer.init(lora), data, np.array([[0, 1], [2, 3], [4, 5], [6, 7]]), np.asarray(logprobs),
                                  seed=0, mesh=mesh)
    return dict(tokens=np.asarray(tokens), logprobs=np.asarray(logprobs), features=np.asarray(features), picks=np.asarray(picks),
                losses=np.asarray(losses), lora=jax.tree.map(np.asarray, state.lora.params))


def parameter_bytes(tree) -> tuple[int, int]:
    """(bytes on one device, bytes of the whole tree)."""
    leaves = jax.tree.leaves(tree)
    return sum(x.addressable_shards[0].data.nbytes for x in leaves), sum(x.nbytes for x in leaves)


def gathers_a_weight(model, lora, data: Sequences, mesh) -> bool:
    """Whether the compiled log-prob program all-gathers any split weight whole (XLA may instead
    gather activations, which keeps every weight split)."""
    text = jax.jit(lambda m, l, rows: batched_logprobs_program(m, l, rows)).lower(model, lora, sharding.put_rows(data, mesh)).compile().as_text()
    split = {tuple(x.shape) for x in jax.tree.leaves(model) if len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated}
    gathered = {tuple(int(d) for d in m.group(1).split(",")) for m in re.finditer(r"= \w+\[([\d,]+)\][^=]*all-gather\(", text)}
    return bool(split & gathered)


def batched_logprobs_program(model, lora, rows: Sequences):
    from jaxdpo.rewards import sequence_logprobs

    return sequence_logprobs(model, lora, rows.input_ids, rows.response_mask, attention_mask=rows.attention_mask)


def planned_selection(mesh) -> dict:
    """The plan's ActiveDPO selection stage for the embedded config on `mesh` (None: one device):
    rows of g per device, and whether the program compiles (the run's program on its layout)."""
    from jaxdpo.config import config_from_dict
    from jaxdpo.experiment.abstract import abstract_round
    from jaxdpo.experiment.compiled import analyze
    from jaxdpo.experiment.stages import round_stages

    config = config_from_dict({"run": {"methods": ["activedpo"], "seeds": [0], "rounds": 2}, "oracle": {"kind": "human"}})
    stage = next(s for s in round_stages(abstract_round(config, mesh)) if s.name == "selection: activedpo")
    fields = stage.args[0]
    features = fields["features"]
    shard = features.shape if mesh is None else features.sharding.shard_shape(features.shape)
    return dict(rows=features.shape[0], rows_per_device=shard[0], candidates=fields["pairs"].shape[0],
                compile_error=analyze(stage.program, stage.args).error)


def relative_diff(got, expected) -> float:
    """max |got − expected| in units of the largest |expected| (float32 sums reassociate over devices)."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-30))


def compare(got, expected) -> dict:
    lora_diff = max(relative_diff(a, b) for a, b in zip(jax.tree.leaves(got["lora"]), jax.tree.leaves(expected["lora"])))
    return dict(
        same_tokens=bool(np.array_equal(got["tokens"], expected["tokens"])),
        logprob_diff=relative_diff(got["logprobs"], expected["logprobs"]),
        feature_diff=relative_diff(got["features"], expected["features"]),
        same_picks=bool(np.array_equal(got["picks"], expected["picks"])),
        loss_diff=relative_diff(got["losses"], expected["losses"]),
        lora_diff=lora_diff,
    )


def main() -> None:
    model, data = tiny_model(), Sequences(*sequences(n=8))
    lora = trained_lora(model)
    expected = stages(model, lora, data, None)
    out = {"devices": len(jax.devices()), "planned_selection_1x1": planned_selection(None)}
    for data_axis, model_axis in [(8, 1), (4, 2), (2, 4)]:
        mesh = sharding.make_mesh(data_axis, model_axis)
        placed = sharding.shard_model(tiny_model(), mesh)
        placed_lora = sharding.shard_params(lora, mesh)
        result = compare(stages(placed, placed_lora, data, mesh), expected)
        on_device, total = parameter_bytes(jax.tree.leaves(placed))
        norms = sum(x.nbytes for x in jax.tree.leaves(placed) if x.ndim <= 2 and x.shape[-1] == 16)  # norm weights, replicated
        result.update(param_fraction=on_device / total, bound=(total - norms) / model_axis / total + norms / total,
                      gate_shard=list(placed.layers["gate"][...].addressable_shards[0].data.shape),
                      gathers_a_weight=gathers_a_weight(placed, placed_lora, data, mesh), planned_selection=planned_selection(mesh))
        out[f"{data_axis}x{model_axis}"] = result
    print(json.dumps(out))


if __name__ == "__main__":
    main()
