"""Checkpoint files: atomic writes, a crash mid-write, damaged and partial checkpoints, no code
execution on load, tied weights, retention and lookup."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from perfml.train import checkpoint as ckpt
from perfml.train.checkpoint import CheckpointError


def sample(step: int = 1):
    weight = torch.randn(8, 4)
    model = {"embed.weight": weight, "head.weight": weight, "norm.weight": torch.ones(4)}
    state = {
        "step": step,
        "optimizer": {"state": {0: {"exp_avg": torch.randn(3)}}},
        "rng": {"torch": torch.get_rng_state(), "python": [1, 2, 3]},
        "note": "x",
    }
    meta = {"step": step, "data": {"fingerprint": "abc"}}
    return model, state, meta


def save(root, step):
    return ckpt.save_checkpoint(root / ckpt.checkpoint_name(step), *sample(step))


def test_round_trip_with_tied_weights_stored_once(tmp_path):
    model, state, meta = sample(3)
    path = ckpt.save_checkpoint(tmp_path / "step-00000003", model, state, meta)
    assert sorted(p.name for p in path.iterdir()) == [
        "DONE",
        "manifest.json",
        "meta.json",
        "model.safetensors",
        "trainer.pt",
    ]
    loaded = ckpt.load_checkpoint(path)
    assert loaded.step == 3 and loaded.meta == meta
    assert set(loaded.model) == set(model)
    assert all(torch.equal(loaded.model[k], v) for k, v in model.items())
    assert loaded.model["head.weight"] is loaded.model["embed.weight"]
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["embed.weight", "norm.weight"]
    assert torch.equal(
        loaded.state["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"]
    )
    assert ckpt.load_checkpoint(path, model_only=True).state == {}


def test_rewriting_the_same_step_replaces_it(tmp_path):
    first = save(tmp_path, 5)
    model, state, meta = sample(5)
    meta["note"] = "second"
    ckpt.save_checkpoint(first, model, state, meta)
    assert ckpt.load_checkpoint(first).meta["note"] == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000005"]


@pytest.mark.parametrize("fail_in", ["save_file", "torch.save", "rename"])
def test_a_crash_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch, fail_in):
    previous = save(tmp_path, 2)

    def write_half_then_die(obj, target, *args, **kwargs):
        with open(target, "wb") if isinstance(target, (str, os.PathLike)) else target as f:
            f.write(b"\x00" * 100)
        raise OSError("disk full")

    import safetensors.torch

    if fail_in == "save_file":
        monkeypatch.setattr(safetensors.torch, "save_file", write_half_then_die)
    elif fail_in == "torch.save":
        monkeypatch.setattr(torch, "save", write_half_then_die)
    else:
        monkeypatch.setattr(os, "rename", lambda *a: (_ for _ in ()).throw(OSError("power cut")))
    with pytest.raises(OSError):
        save(tmp_path, 4)
    monkeypatch.undo()
    assert ckpt.resolve_checkpoint(tmp_path) == previous
    assert ckpt.load_checkpoint(previous).step == 2
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002"]  # the temp dir is gone


_KILLED_WRITER = """
import sys, time
import safetensors.torch, torch
from perfml.train import checkpoint as ckpt

root = sys.argv[1]
ckpt.save_checkpoint(root + "/step-00000002", {"w": torch.ones(4)}, {"step": 2}, {"step": 2})

def slow_save(tensors, path, metadata=None):
    with open(path, "wb") as f:
        f.write(b"\\x00" * 64)
        f.flush()
    print("writing", flush=True)
    time.sleep(60)

safetensors.torch.save_file = slow_save
ckpt.save_checkpoint(root + "/step-00000004", {"w": torch.ones(4)}, {"step": 4}, {"step": 4})
"""


def test_a_writer_killed_mid_write_leaves_the_previous_checkpoint_latest(tmp_path):
    from tests.train.conftest import subprocess_env

    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(tmp_path)],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline() == "writing\n"
    child.kill()  # SIGKILL: no cleanup code runs
    child.wait()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-step-00000004")]
    assert len(leftovers) == 1
    latest = ckpt.resolve_checkpoint(tmp_path)
    assert latest.name == "step-00000002" and ckpt.load_checkpoint(latest).step == 2
    ckpt.remove_leftovers(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002"]


def test_missing_done_marker_is_a_partial_checkpoint(tmp_path):
    path = save(tmp_path, 7)
    (path / "DONE").unlink()
    with pytest.raises(
        CheckpointError, match=f"{path / 'DONE'}: missing, so checkpoint {path} is partial"
    ):
        ckpt.load_checkpoint(path)


@pytest.mark.parametrize("name", ["model.safetensors", "trainer.pt", "meta.json"])
def test_truncated_file_is_named(tmp_path, name):
    path = save(tmp_path, 1)
    file = path / name
    file.write_bytes(file.read_bytes()[:-7])
    with pytest.raises(
        CheckpointError, match=f"{file}: .* bytes where DONE records .*: truncated or damaged"
    ):
        ckpt.load_checkpoint(path)


@pytest.mark.parametrize("name", ["model.safetensors", "trainer.pt"])
def test_flipped_byte_is_named(tmp_path, name):
    path = save(tmp_path, 1)
    file = path / name
    raw = bytearray(file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    file.write_bytes(bytes(raw))
    with pytest.raises(
        CheckpointError, match=f"{file}: sha256 differs from the one DONE records: corrupt"
    ):
        ckpt.load_checkpoint(path)


def reseal(path):
    """Rewrite DONE to match the files as they are now (a damaged file with a valid record)."""
    files = {n: ckpt._describe(path / n) for n in ("model.safetensors", "trainer.pt", "meta.json")}
    (path / "DONE").write_text(json.dumps({"format": ckpt.FORMAT, "files": files}))


def test_unparseable_files_with_a_matching_record_are_named(tmp_path):
    path = save(tmp_path, 1)
    (path / "model.safetensors").write_bytes(b"not safetensors at all")
    reseal(path)
    with pytest.raises(CheckpointError, match=f"{path / 'model.safetensors'}: cannot be read"):
        ckpt.load_checkpoint(path)
    path = save(tmp_path, 2)
    (path / "trainer.pt").write_bytes(b"garbage")
    reseal(path)
    with pytest.raises(CheckpointError, match=f"{path / 'trainer.pt'}: cannot be read"):
        ckpt.load_checkpoint(path)


class _Payload:
    def __reduce__(self):
        return (os.mkdir, (_Payload.target,))


def test_loading_never_runs_code_from_a_file(tmp_path):
    path = save(tmp_path, 1)
    _Payload.target = str(tmp_path / "pwned")
    with open(path / "trainer.pt", "wb") as f:
        pickle.dump({"step": 1, "x": _Payload()}, f, protocol=2)
    reseal(path)
    with pytest.raises(CheckpointError, match="trainer.pt: cannot be read: UnpicklingError"):
        ckpt.load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_bad_manifest_and_missing_directory(tmp_path):
    path = save(tmp_path, 1)
    (path / "DONE").write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{path / 'DONE'}: cannot be read"):
        ckpt.load_checkpoint(path)
    (path / "DONE").write_text("[]")
    with pytest.raises(CheckpointError, match="not a perfml checkpoint manifest"):
        ckpt.load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no-such: no such checkpoint directory"):
        ckpt.load_checkpoint(tmp_path / "no-such")


def test_resolve_latest_best_and_explicit(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    paths = [save(root, s) for s in (9, 10, 100)]
    assert ckpt.resolve_checkpoint(tmp_path / "run") == paths[-1]  # numeric, not text, order
    assert ckpt.resolve_checkpoint(root) == paths[-1]
    assert ckpt.resolve_checkpoint(paths[0]) == paths[0]
    with pytest.raises(CheckpointError, match="best.json: missing"):
        ckpt.resolve_checkpoint(tmp_path / "run", "best")
    ckpt.write_json_atomic(root / ckpt.BEST_FILE, {"name": paths[1].name, "step": 10})
    assert ckpt.resolve_checkpoint(tmp_path / "run", "best") == paths[1]
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        ckpt.resolve_checkpoint(tmp_path / "empty")


def test_prune_keeps_the_newest_and_the_best(tmp_path):
    paths = [save(tmp_path, s) for s in range(1, 7)]
    ckpt.write_json_atomic(tmp_path / ckpt.BEST_FILE, {"name": paths[1].name, "step": 2})
    deleted = ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert deleted == [paths[0], paths[2], paths[3]]
    assert ckpt.list_checkpoints(tmp_path) == [paths[1], paths[4], paths[5]]
    assert ckpt.prune_checkpoints(tmp_path, keep_last=0) == []
