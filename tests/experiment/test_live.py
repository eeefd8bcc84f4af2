"""Live metrics on their own: which fields of a row are logged, and a TensorBoard run rewritten
from the checkpoint's history when a process starts (a row logged by a killed process, then
recomputed, shows once). The readers here also serve tests/test_export.py."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from jaxdpo.experiment.live import TensorBoardLog, scalars
from jaxdpo.experiment.storage import Track


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of the event files in `folder`, in file and write order (TFRecord
    framing: length, its checksum, the Event, its checksum)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for file in sorted(folder.glob("events.out.tfevents.*")):
        data, at = file.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def wandb_history(path: Path) -> list[dict]:
    """The history rows of a W&B run file (.wandb: a header, then W&B's LevelDB-style log of
    protobuf `Record`s in 32 KiB blocks, each chunk with a 7-byte header: checksum, length, type)."""
    from wandb.proto import wandb_internal_pb2

    data, at, chunk, rows = path.read_bytes(), 7, b"", []
    while at + 7 <= len(data):
        if 32768 - at % 32768 < 7:  # a block's tail too short for a header is padding
            at += 32768 - at % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[at : at + 7])
        chunk, at = chunk + data[at + 7 : at + 7 + length], at + 7 + length
        if kind in (1, 4):  # a whole record, or its last chunk
            record = wandb_internal_pb2.Record.FromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def test_every_finite_numeric_field_is_logged_whatever_its_name():
    row = dict(method="activedpo", seed=3, round=2, labels=32, eval_reward=0.5, win_rate=None, kl_to_ref=0.01,
               ref_nll=float("nan"), generation_s=1.5, converged=True)
    assert scalars(row) == {"round": 2.0, "labels": 32.0, "eval_reward": 0.5, "kl_to_ref": 0.01, "seconds/generation": 1.5}


def test_a_new_process_rewrites_the_track_from_its_checkpoint(tmp_path):
    track = Track("activedpo", 0)
    rows = [dict(round=t, labels=4 * t, eval_reward=0.1 * t) for t in range(3)]
    killed = TensorBoardLog(tmp_path)
    for t in range(3):
        killed.report(track, rows[: t + 1])
    killed.close()  # round 2 was logged, then the process died before its checkpoint
    recomputed = [*rows[:2], dict(round=2, labels=8, eval_reward=0.25)]
    resumed = TensorBoardLog(tmp_path)
    resumed.report(track, rows[:2])  # the history the checkpoint holds
    resumed.report(track, recomputed)
    resumed.close()
    assert len(list((tmp_path / track.name).glob("events.out.tfevents.*"))) == 1
    logged = tensorboard_scalars(tmp_path / track.name)
    assert [step for step, _ in logged["eval_reward"]] == [0, 4, 8]
    assert [round(value, 6) for _, value in logged["eval_reward"]] == [0.0, 0.1, 0.25]
