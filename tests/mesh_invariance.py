"""Run in a subprocess with 8 host CPU devices: the embedded config, shrunk (1 seed, 2 rounds,
8 prompts per round, activedpo and random, small LoRA), on meshes 1×1, 4×2, 8×1 and 1×8 (data ×
model), 4×2 with `generation.chunk_rows` 6 (4 prompts per call, where the others make one call);
every response `Setup.generate` returns is recorded. Prints one JSON object: for each run against the 1×1 run, whether the round-0
evaluation samples, the round-1 responses (every track) and the round-1 labels.jsonl picks are
identical, the same for round 2, and the largest final-reward difference."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxdpo import experiment  # noqa: E402
from jaxdpo.config import config_from_dict  # noqa: E402
from jaxdpo.experiment.setup import Setup, derive_key  # noqa: E402

SEED, ROUNDS = 0, 2
VARIANTS = {"1x1": (1, 1, 128), "4x2 chunk_rows=6": (4, 2, 6), "8x1": (8, 1, 128), "1x8": (1, 8, 128)}  # (data, model, chunk_rows)
PURPOSES = {f"{purpose}/{round_}": derive_key(SEED, purpose, round_) for purpose in ("generate", "eval") for round_ in range(ROUNDS + 1)}


def config(data: int, model: int, chunk_rows: int):
    return config_from_dict({
        "run": {"methods": ["activedpo", "random"], "seeds": [SEED], "rounds": ROUNDS},
        "data": {"prompts_per_round": 8}, "selection": {"batch_size": 4}, "features": {"dim": 256, "chunk_size": 8},
        "lora": {"rank": 2, "alpha": 4.0, "targets": ["q", "v"]}, "dpo": {"epochs": 2, "batch_size": 4, "train_on": "new"},
        "eval": {"prompts": 8, "samples_per_prompt": 3},  # the responses' shapes: one generation program
        "generation": {"chunk_rows": chunk_rows}, "mesh": {"data": data, "model": model},
    })


def purpose(key) -> str:
    data = np.asarray(jax.random.key_data(key))
    return next(name for name, known in PURPOSES.items() if np.array_equal(data, np.asarray(jax.random.key_data(known))))


def recorded_run(out: Path, data: int, model: int, chunk_rows: int, sft: Path | None) -> dict:
    """One run; its responses per call (in call order, by purpose), labels and final rewards."""
    calls = []
    generate = Setup.generate

    def recording(self, prompts, *, key, **kwargs):
        responses = generate(self, prompts, key=key, **kwargs)
        calls.append((purpose(key), responses.input_ids))
        return responses

    if sft is not None:
        shutil.copytree(sft, out / "sft-model")
    Setup.generate = recording
    try:
        experiment.run(config(data, model, chunk_rows), out)
    finally:
        Setup.generate = generate
    metrics = [json.loads(line) for line in (out / experiment.METRICS).read_text().splitlines()]
    labels = experiment.read_labels(out / experiment.LABELS)
    return dict(
        calls=calls,
        labels={r: [(x.method, x.pick, x.candidate, x.input_ids_a, x.input_ids_b, x.preferred) for x in labels if x.round == r] for r in (1, 2)},
        rewards={row["method"]: row["eval_reward"] for row in metrics if row["round"] == ROUNDS},
    )


def same_calls(got: dict, expected: dict, name: str) -> bool:
    pairs = [(a, b) for (p, a), (q, b) in zip(got["calls"], expected["calls"], strict=True) if p == q == name]
    assert len(pairs) == sum(p == name for p, _ in expected["calls"]) > 0, name
    return all(np.array_equal(a, b) for a, b in pairs)


def main() -> None:
    root = Path(tempfile.mkdtemp())
    runs, sft = {}, None
    for name, (data, model, chunk_rows) in VARIANTS.items():
        out = root / name.replace(" ", "-")
        runs[name] = recorded_run(out, data, model, chunk_rows, sft)
        sft = sft or out / "sft-model"  # trained once, loaded by the other runs
    expected = runs["1x1"]
    result = {"devices": len(jax.devices())}
    for name, got in runs.items():
        result[name] = dict(
            same_eval_0=same_calls(got, expected, "eval/0"),
            same_responses_1=same_calls(got, expected, "generate/1"),
            same_picks_1=got["labels"][1] == expected["labels"][1],
            same_responses_2=same_calls(got, expected, "generate/2"),
            same_picks_2=got["labels"][2] == expected["labels"][2],
            reward_diff=max(abs(got["rewards"][m] - expected["rewards"][m]) for m in expected["rewards"]),
            rewards=got["rewards"],
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
