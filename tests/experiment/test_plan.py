"""`jaxdpo plan` and the stage programs it shares with the run: loop-aware costs against the
matmuls each program runs, loops read from HLO text, the stages a config's methods need and their calls, the local plan against the run's own
memory plan, the exit-2 path, a plan resumed from its cache of stages, and a small model compiled
for a TPU slice through libtpu."""

import json
import math
import os
import re
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxdpo import embedded
from jaxdpo.cli import main
from jaxdpo.config import config_from_dict
from jaxdpo.errors import EXIT_USER_ERROR, UserError
from jaxdpo.experiment import hlo_loops, memory, stages
from jaxdpo.experiment import plan as planning
from jaxdpo.experiment.abstract import abstract_round
from jaxdpo.experiment.compiled import analyze, required_bytes
from jaxdpo.experiment.plan import parse_mesh
from jaxdpo.experiment.targets import chip_of
from jaxdpo.experiment.setup import build_setup
from jaxdpo.models import Decoder, DecoderConfig, save_pretrained
from jaxdpo.models.decoder import layer_shapes

ROOT = Path(__file__).resolve().parents[2]
SMALL = {  # the embedded task at the smallest shapes, one method: four stages
    "run": {"methods": ["random"], "seeds": [0], "rounds": 3},
    "data": {"prompts_per_round": 8},
    "selection": {"batch_size": 4},
    "lora": {"rank": 2, "alpha": 4.0},
    "dpo": {"epochs": 2, "batch_size": 4},
    "oracle": {"kind": "human"},
    "eval": {"prompts": 8},
}


def _layers(w, x):
    return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, w)[0]


def _unrolled(w, x):
    for layer in range(w.shape[0]):
        x = jnp.tanh(x @ w[layer])
    return x


def _grad_of(layers):
    return lambda w, x: jax.grad(lambda w: jnp.sum(layers(w, x)))(w)


def _accumulated(grad):
    """A scan over micro-batches around a gradient (the DPO step's shape: loops in loops)."""
    return lambda w, xs: jax.lax.scan(lambda total, x: (total + grad(w, x), None), jnp.zeros_like(w), xs)[0]


def _decode(x, steps):
    return jax.lax.while_loop(lambda s: s[1] < steps, lambda s: (jnp.tanh(s[0] @ s[0]), s[1] + 1), (x, 0))[0]


def test_loop_costs_count_every_matmul_the_looped_program_runs():
    """FLOPs against the matmuls each program runs: a scan over 3 layers runs 3, its gradient 3
    forward and 6 backward (a looped backward pass also computes the first layer's input gradient,
    which an unrolled one drops), 4 micro-batches of it 36, a bounded `while_loop` its 5."""
    w = jax.ShapeDtypeStruct((3, 64, 64), jnp.float32)  # an odd and an even trip count: 3 layers, 4 micro-batches
    x, xs = jax.ShapeDtypeStruct((32, 64), jnp.float32), jax.ShapeDtypeStruct((4, 32, 64), jnp.float32)
    matmul = 2 * 32 * 64 * 64
    cases = [(_layers, (w, x), 3), (_grad_of(_layers), (w, x), 9), (_accumulated(_grad_of(_layers)), (w, xs), 36)]
    for looped, args, matmuls in cases:
        got = analyze(looped, args, costs=True)
        assert got.flops == pytest.approx(matmuls * matmul, rel=0.03)  # tanh and the sums: under 2 %
        assert got.need == analyze(looped, args).need  # the memory of the program as compiled, loops kept
    square = jax.ShapeDtypeStruct((48, 48), jnp.float32)
    decode = analyze(lambda x: _decode(x, 5), (square,), costs=True, loop_trips=7)
    assert decode.flops == pytest.approx(5 * 2 * 48**3, rel=0.01)  # the bound XLA reads beats the stage's


_LOOPS_HLO = """HloModule looped

%body (state: (s32[], f32[16,16])) -> (s32[], f32[16,16]) {
  %state = (s32[], f32[16,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %x = f32[16,16]{1,0} get-tuple-element(%state), index=1
  %y = f32[16,16]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %out = (s32[], f32[16,16]{1,0}) tuple(%next, %y)
}

%counted (state.1: (s32[], f32[16,16])) -> pred[] {
  %state.1 = (s32[], f32[16,16]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%state.1), index=0
  %limit = s32[] constant(9)
  ROOT %lt = pred[] compare(%i.1, %limit), direction=LT
}

%open (state.2: (s32[], f32[16,16])) -> pred[] {
  %state.2 = (s32[], f32[16,16]{1,0}) parameter(0)
  %x.2 = f32[16,16]{1,0} get-tuple-element(%state.2), index=1
  %zero = f32[] constant(0)
  %corner = f32[1,1]{1,0} slice(%x.2), slice={[0:1], [0:1]}
  %c = f32[] reshape(%corner)
  ROOT %gt = pred[] compare(%c, %zero), direction=GT
}

ENTRY %main (x.3: f32[16,16]) -> f32[16,16] {
  %x.3 = f32[16,16]{1,0} parameter(0)
  %start = s32[] constant(2)
  %copied = s32[] copy(%start)
  %init = (s32[], f32[16,16]{1,0}) tuple(%copied, %x.3)
  %first = (s32[], f32[16,16]{1,0}) while(%init), condition=%counted, body=%body
  %second = (s32[], f32[16,16]{1,0}) while(%first), condition=%open, body=%body
  ROOT %result = f32[16,16]{1,0} get-tuple-element(%second), index=1
}
"""


def test_loops_read_from_hlo_text_without_annotations():
    """The TPU compiler's HLO states no trip counts: `i < 9` from a constant 2 runs 7 times, a
    data-dependent condition runs the stage's bound; a body's cost is XLA's for that computation."""
    found = hlo_loops.loops(_LOOPS_HLO, 4)
    assert found == [hlo_loops.Loop("body", (7,)), hlo_loops.Loop("body", (4,))]
    flops, bytes_accessed = hlo_loops.body_cost(_LOOPS_HLO, "body")
    assert flops == pytest.approx(2 * 16**3, rel=0.01)
    assert bytes_accessed >= 2 * 16 * 16 * 4  # x read, y written
    w, xs = jax.ShapeDtypeStruct((3, 64, 64), jnp.float32), jax.ShapeDtypeStruct((4, 32, 64), jnp.float32)
    text = jax.jit(_accumulated(_grad_of(_layers))).lower(w, xs).compile().as_text()
    unannotated = re.sub(r'"known_trip_count":\{"n":"\d+"\}', "", text)
    assert unannotated != text and hlo_loops.loops(unannotated, 1) == hlo_loops.loops(text, 1)
    assert sorted(loop.trips for loop in hlo_loops.loops(text, 1)) == [(4,), (4, 3), (4, 3)]  # micro-batches, then layers forward and back


def test_round_stages_and_their_calls_follow_the_methods():
    config = config_from_dict({**SMALL, "run": {"methods": ["activedpo", "aplp", "apo", "random"], "seeds": [0], "rounds": 3},
                               "oracle": {"kind": "synthetic"}, "eval": {"prompts": 20}})
    shape = abstract_round(config, None)
    got = {stage.name: stage for stage in stages.round_stages(shape)}
    m, k, prompts, batch = 3, config.generation.entropy_samples, 8, 4
    assert set(got) == {
        f"generation: responses ({m} per prompt)", f"generation: entropy samples ({k} per prompt)", "generation: evaluation (1 per prompt)",
        "log-probs", "features", "frozen features", "DPO step", "selection: activedpo", "selection: aplp", "selection: apo", "selection: random",
    }
    last = {name: {method: calls[-1] for method, calls in stage.calls.items()} for name, stage in got.items()}
    assert last[f"generation: entropy samples ({k} per prompt)"] == {"activedpo": 0, "aplp": 1, "apo": 0, "random": 0}
    assert last["generation: evaluation (1 per prompt)"]["random"] == 1  # 128 rows a call: every prompt at once
    # round t: (t − 1)·4 labeled pairs feed the prior, train_on = "all" trains on t·4 pairs
    for t in (1, 2, 3):
        responses, labeled_rows, trained_rows = prompts * m, 2 * (t - 1) * batch, 2 * t * batch
        features = math.ceil(responses / 16) + math.ceil(labeled_rows / 16)
        assert got["features"].calls["activedpo"][t - 1] == got["frozen features"].calls["apo"][t - 1] == features
        assert got["features"].calls["apo"][t - 1] == got["frozen features"].calls["activedpo"][t - 1] == 0
        guard = math.ceil(20 / 16) + 2 * math.ceil(20 / 16)  # the held-out references, the samples under policy and reference
        assert got["log-probs"].calls["random"][t - 1] == math.ceil(trained_rows / 16) + guard
        entropy = math.ceil(prompts * k / 16)
        assert got["log-probs"].calls["aplp"][t - 1] == 2 * math.ceil(responses / 16) + entropy + math.ceil(trained_rows / 16) + guard
        assert got["DPO step"].calls["apo"][t - 1] == 2 * math.ceil(t * batch / 4)
    assert got["selection: aplp"].calls == {"activedpo": (0,) * 3, "aplp": (1,) * 3, "apo": (0,) * 3, "random": (0,) * 3}
    alone = stages.round_stages(abstract_round(config_from_dict(SMALL), None))  # random alone: no entropy, no features
    assert [stage.name for stage in alone] == [
        f"generation: responses ({m} per prompt)", "generation: evaluation (1 per prompt)", "log-probs", "DPO step", "selection: random"
    ]
    assert got["features"].timed_as == ("features",) and "training" in got["log-probs"].timed_as
    # each decode step after the prefill reads every layer's keys and values of every row and slot
    c, itemsize = embedded.MODEL_CONFIG, jnp.dtype(shape.model.dtype).itemsize
    for samples, prompts_in_pool in ((m, prompts), (k, prompts), (1, 20)):
        name = next(name for name in got if name.startswith("generation") and f"({samples} per prompt)" in name)
        rows = stages.prompts_per_call(config, samples, prompts_in_pool, None) * samples
        slots = shape.prompt_len + shape.max_new_tokens
        assert got[name].state_reads == (shape.max_new_tokens - 1) * 2 * c.num_layers * rows * c.num_kv_heads * c.head_dim * slots * itemsize
    assert got["log-probs"].state_reads == got["DPO step"].state_reads == 0


def test_the_local_plan_compiles_the_programs_of_the_runs_memory_plan(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    save_pretrained(Decoder(embedded.MODEL_CONFIG, rngs=nnx.Rngs(0)), out / "sft-model")  # the run's SFT model, untrained
    config = config_from_dict(SMALL)
    on_device = list(memory.plan_memory(build_setup(config, out)))
    path = tmp_path / "small.yaml"
    path.write_text(json.dumps(SMALL))  # JSON is YAML
    too_small = sorted(plan.bytes for plan in on_device)[-2]  # the largest stage does not fit, the others do
    monkeypatch.setattr(memory, "device_memory", lambda: too_small)
    report = tmp_path / "plan.json"
    assert main(["plan", str(path), "--target", "local", "--memory-only", "--json", str(report)]) == EXIT_USER_ERROR
    planned = json.loads(report.read_text())["stages"]
    assert [(p["stage"], p["key"], p["bytes"]) for p in planned] == [(p.stage, p.key, p.bytes) for p in on_device]
    largest = max(on_device, key=lambda p: p.bytes)
    error = capsys.readouterr().err
    assert f"{largest.key} ({largest.stage} needs" in error and "does not fit" in error
    assert sum(not p["fits"] for p in planned) == 1


def test_a_plan_with_a_cache_compiles_only_the_stages_it_lacks(tmp_path, monkeypatch):
    """A plan killed before its last stage and while writing a line goes on from its cache: it
    compiles that stage alone and reports what a plan from scratch reports."""
    config = config_from_dict(SMALL)
    compiled = []
    monkeypatch.setattr(planning, "analyze", lambda program, args, **kw: compiled.append(1) or analyze(program, args, **kw))
    cache = tmp_path / "stages.jsonl"
    whole = planning.plan(config, "local", costs=False, cache=cache)
    lines = cache.read_text().splitlines()
    stages_of_a_round = len(whole["stages"])
    assert len(compiled) == len(lines) == stages_of_a_round
    cache.write_text("".join(f"{line}\n" for line in lines[:-1]) + lines[-1][:40])  # killed while writing the last
    compiled.clear()
    resumed = planning.plan(config, "local", costs=False, cache=cache)
    assert len(compiled) == 1 and len(cache.read_text().splitlines()) == stages_of_a_round
    timeless = lambda report: [{k: v for k, v in row.items() if k != "compile_seconds"} for row in report["stages"]]  # noqa: E731
    assert timeless(resumed) == timeless(whole)
    other = config_from_dict({**SMALL, "lora": {"rank": 4, "alpha": 8.0}})  # other adapter shapes: other keys
    planning.plan(other, "local", costs=False, cache=cache)
    assert len(compiled) == 1 + stages_of_a_round - 1, len(compiled)  # all but the selection take the adapter
    cache.write_text("not json\n" + cache.read_text())
    with pytest.raises(UserError, match="line 1 is not a stage's analysis"):
        planning.plan(config, "local", costs=False, cache=cache)


def test_a_jax_reward_model_is_a_stage_and_stays_resident_in_the_others(tmp_path):
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "config.json").write_text(json.dumps(TINY_LLAMA))
    config = config_from_dict({**SMALL, "oracle": {"kind": "reward_model", "path": str(tmp_path / "rm"), "batch_size": 4}})
    shape = abstract_round(config, None)
    held = stages.long_lived(shape)
    c = TINY_LLAMA  # float32, the head tied to the embedding, a [hidden, 1] score head
    per_layer = sum(math.prod(s) for s in layer_shapes(DecoderConfig.from_hf({**c, "tie_word_embeddings": True})).values())
    assert held["reward model"] == 4 * (c["num_hidden_layers"] * per_layer + c["vocab_size"] * c["hidden_size"] + 2 * c["hidden_size"])
    got = {stage.name: stage for stage in stages.round_stages(shape)}
    assert got["reward model"].calls["random"][-1] == math.ceil(config.eval.prompts / 4) + math.ceil(2 * 4 / 4)  # evaluation + labels
    assert got["reward model"].resident(held) == held["policy"] + 2 * held["adapter"] + 2 * held["optimizer"]
    assert got["log-probs"].resident(held) == held["reward model"] + held["adapter"] + 2 * held["optimizer"]
    assert got["DPO step"].resident(held) == held["reward model"] + held["adapter"] + held["optimizer"]


def test_the_bytes_a_refused_program_needed():
    refusal = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (20.00G) exceeds "
               "available HBM (15.75G).")  # libtpu 0.0.42's words, compiling 10 GiB in and out for a v5e chip
    assert required_bytes(refusal) == 20 * 2**30
    assert required_bytes("INVALID_ARGUMENT: shapes do not match") is None


def test_chips_by_device_kind():
    assert chip_of("TPU v5 lite").name == "TPU v5e" and chip_of("TPU v5").name == "TPU v5p" and chip_of("TPU v6 lite").name == "TPU v6e"
    assert chip_of("NVIDIA H100 80GB HBM3").peak_flops == 989e12 and chip_of("cpu") is None


def test_mesh_argument():
    assert parse_mesh("4,2") == (4, 2) and parse_mesh(None) is None
    for bad in ("4", "a,b", "0,2", "4,2,1"):
        with pytest.raises(Exception, match="--mesh: expected two positive integers"):
            parse_mesh(bad)


TPU_PYTHON = os.environ.get("JAXDPO_TPU_PYTHON")
TINY_LLAMA = {  # four layers, so a cost that counted the layer scan once would be a quarter of the truth
    "model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "eos_token_id": 2, "pad_token_id": 0, "bos_token_id": 1, "max_position_embeddings": 512,
}


@pytest.mark.slow
@pytest.mark.skipif(not TPU_PYTHON, reason="JAXDPO_TPU_PYTHON names no Python with libtpu (.ci/run builds .venv-tpu)")
def test_a_small_model_planned_for_a_tpu_slice(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(TINY_LLAMA))
    (tmp_path / "prompts.jsonl").write_text("")
    config = {  # ActiveDPO brings the features stage and the selection split over the mesh's 4 chips
        **SMALL, "run": {**SMALL["run"], "methods": ["random", "activedpo"]}, "model": {"path": "model", "dtype": "bfloat16"},
        "data": {"source": "jsonl", "path": "prompts.jsonl", "max_prompt_tokens": 24, "prompts_per_round": 8},
        "generation": {"max_new_tokens": 8},
    }
    (tmp_path / "plan.yaml").write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")} | {"PYTHONPATH": str(ROOT)}
    command = [TPU_PYTHON, "-m", "jaxdpo.cli", "plan", "plan.yaml", "--target", "v4-8", "--mesh", "2,2", "--json", "out.json"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out.json").read_text())
    assert (report["devices"], report["device_kind"], report["mesh"]) == (4, "TPU v4", {"data": 2, "model": 2})
    assert 30 * 2**30 < report["limit_bytes"] <= 32 * 2**30  # what the v4 compiler says a program may use
    rows = {row["stage"]: row for row in report["stages"]}
    assert set(rows) == {
        "generation: responses (3 per prompt)", "generation: evaluation (1 per prompt)", "log-probs", "features", "DPO step", "selection: random",
        "selection: activedpo",
    }
    assert report["fits"]
    chip = report["chip"]
    for row in rows.values():
        assert row["seconds_per_call"] == max(row["flops"] / chip["peak_flops"], row["bytes_accessed"] / chip["bandwidth"])
        # a decode step reads every weight, and after the prefill every slot of the bf16 KV cache, a quarter per chip
        samples = int(row["stage"].split("(")[1].split()[0]) if row["stage"].startswith("generation") else 0
        trips, c = (8 if samples else 1), TINY_LLAMA
        cache = 2 * c["num_hidden_layers"] * 8 * samples * c["num_key_value_heads"] * c["head_dim"] * (24 + 8) * 2
        assert row["floor_reads"] == trips * row["arguments"] + (trips - 1) * cache // 4
        assert row["floor_seconds_per_call"] == max(row["flops"] / chip["peak_flops"], row["floor_reads"] / chip["bandwidth"])
    for estimate, per_call in (("", "seconds_per_call"), ("_floor", "floor_seconds_per_call")):
        last_round = sum(row[per_call] * sum(calls[-1] for calls in row["calls"].values()) for row in rows.values())
        every_round = sum(row[per_call] * sum(map(sum, row["calls"].values())) for row in rows.values())
        assert report[f"round{estimate}_seconds"] == pytest.approx(last_round) and report[f"run{estimate}_seconds"] == pytest.approx(every_round)
    assert 0 < report["round_floor_seconds"] <= report["round_seconds"]
    assert rows["DPO step"]["calls"]["random"] == [2 * 1, 2 * 2, 2 * 3]  # 2 epochs over 4, 8, 12 pairs in batches of 4
    assert rows["selection: activedpo"]["calls"] == {"random": [0, 0, 0], "activedpo": [1, 1, 1]} and rows["selection: activedpo"]["flops"] > 0
    # log-probs of 16 rows × 32 tokens, every position: 2 FLOPs per weight and token in the layers' matmuls and the head,
    # plus attention (QKᵀ and PV: 4·seq·heads·head_dim per token and layer); the rows split over 2 data devices, the
    # weights over 2 model devices (which share out the work, or not: between a quarter and a half per device)
    c, tokens, seq = TINY_LLAMA, 16 * 32, 32
    heads = c["num_attention_heads"] * c["head_dim"]
    layer = 2 * c["hidden_size"] * heads + 2 * c["hidden_size"] * c["num_key_value_heads"] * c["head_dim"] + 3 * c["hidden_size"] * c["intermediate_size"]
    analytic = tokens * (2 * (c["num_hidden_layers"] * layer + c["hidden_size"] * c["vocab_size"]) + c["num_hidden_layers"] * 4 * seq * heads)
    assert analytic / 4 * 0.9 < rows["log-probs"]["flops"] < analytic / 2 * 1.5
