"""Manifests of checkpoints, model directories and ONNX exports (perfml.lineage): what they
record, verification on load (a flipped byte or a truncated file names the file; --no-verify
loads it; a directory without a manifest loads with a warning), and `perfml info`'s chain."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import pytest

from perfml import cli, lineage, runs
from perfml.train.checkpoint import CheckpointError, resolve_checkpoint


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flip_last_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checkpoint_manifest_points_to_done(run_dir):
    ckpt = resolve_checkpoint(run_dir)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    meta = json.loads((ckpt / "meta.json").read_text())
    assert manifest["kind"] == "checkpoint" and manifest["verified_by"] == "DONE"
    # the sizes and hashes of the checkpoint's files live in DONE alone; the manifest names DONE
    done = ckpt / "DONE"
    assert manifest["files"] == {"DONE": {"bytes": done.stat().st_size, "sha256": sha256(done)}}
    assert manifest["producer"] == {"step": "train", "config": meta["config"], "train_step": 6}
    assert manifest["data_fingerprint"] == meta["data"]["fingerprint"]
    assert manifest["metrics"]["val_loss"] == meta["val_loss"]
    assert manifest["versions"]["perfml"] == meta["versions"]["perfml"]
    assert manifest["parent"] is None


def test_pass_outputs_record_files_producer_parent_and_metrics(chain_dirs):
    run, pruned, quantized = chain_dirs
    ckpt = resolve_checkpoint(run)
    for folder, parent, pass_name in ((pruned, ckpt, "prune"), (quantized, pruned, "quantize")):
        manifest = json.loads((folder / "manifest.json").read_text())
        names = sorted(p.name for p in folder.iterdir() if p.name != "manifest.json")
        assert sorted(manifest["files"]) == names
        assert {"model.safetensors", "perfml_model.json", "report.json", "tokenizer.json"} <= set(
            names
        )
        for name, record in manifest["files"].items():
            assert record == {
                "bytes": (folder / name).stat().st_size,
                "sha256": sha256(folder / name),
            }
        assert manifest["producer"]["step"] == pass_name
        assert manifest["parent"] == {
            "path": str(parent.resolve()),
            "kind": "checkpoint" if parent == ckpt else "model",
            "manifest_sha256": sha256(parent / "manifest.json"),
        }
        report = json.loads((folder / "report.json").read_text())
        assert manifest["metrics"]["ppl_before"] == report["before"]["ppl"]
        assert manifest["metrics"]["ppl_after"] == report["after"]["ppl"]
        assert manifest["data_fingerprint"] == report["data_fingerprint"]
        assert manifest["lineage"]["run"] == str(run)
    assert json.loads((quantized / "manifest.json").read_text())["producer"]["config"] == (
        "Int8WeightOnlyConfig"
    )


def test_info_prints_the_chain_up_to_the_run(chain_dirs, capsys):
    run, pruned, quantized = chain_dirs
    ckpt = resolve_checkpoint(run)
    assert cli.main(["info", str(quantized)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{quantized}: model directory\n")
    assert "model.safetensors" in out and "producer: quantize Int8WeightOnly" in out
    chain = out[out.index("lineage (newest first):") :].splitlines()[1:]
    assert [line.split()[:2] for line in chain] == [
        ["model", str(quantized)],
        ["model", str(pruned.resolve())],
        ["checkpoint", str(ckpt.resolve())],
        ["run", str(run.resolve())],
    ]
    report = json.loads((quantized / "report.json").read_text())
    assert f"ppl {report['before']['ppl']:.3f} -> {report['after']['ppl']:.3f}" in chain[0]
    assert "verified" in chain[0] and "train tiny to step 6" in chain[2]
    assert cli.main(["info", str(quantized), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [s["kind"] for s in info["chain"]] == ["model", "model", "checkpoint", "run"]
    assert all(s["verified"] for s in info["chain"][:3])
    assert info["manifest"]["producer"]["step"] == "quantize"
    assert cli.main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{run}: training run" in out and f"latest: {ckpt}" in out


def test_info_refuses_a_parent_changed_after_its_child(chain_dirs, tmp_path, capsys):
    run, pruned, _ = chain_dirs
    ckpt = resolve_checkpoint(run)
    copy = tmp_path / "pruned"
    shutil.copytree(pruned, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["parent"]["manifest_sha256"] = "0" * 64  # as if the checkpoint had been rewritten
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert cli.main(["info", str(copy)]) == 2
    err = capsys.readouterr().err
    assert f"{ckpt.resolve() / 'manifest.json'}: sha256" in err and "parent changed" in err
    assert cli.main(["info", str(copy), "--no-verify"]) == 0


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_model_dir_file_is_refused_by_name(chain_dirs, tmp_path, damage, capsys):
    _, pruned, _ = chain_dirs
    copy = tmp_path / "pruned"
    shutil.copytree(pruned, copy)
    file = copy / "model.safetensors"
    if damage == "flip":
        flip_last_byte(file)  # a weight's last byte: still a readable safetensors file
        expect = f"{file}: sha256 .* differs from .* that {copy / 'manifest.json'} records"
    else:
        file.write_bytes(file.read_bytes()[:-100])
        expect = f"{file}: {file.stat().st_size} bytes where {copy / 'manifest.json'} records"
    with pytest.raises(lineage.ManifestError, match=expect):
        runs.load_model(copy)
    from perfml.quant import model_dir

    with pytest.raises(lineage.ManifestError, match=expect):
        model_dir.load_model_dir(copy)
    assert cli.main(["eval", str(copy), "--batches", "1"]) == 2
    assert str(file) in capsys.readouterr().err
    if damage == "flip":
        assert cli.main(["eval", str(copy), "--batches", "1", "--no-verify"]) == 0
        assert "perplexity" in capsys.readouterr().out
        assert runs.load_model(copy, verify=False).kind == runs.MODEL_DIR


def test_a_damaged_checkpoint_is_refused_and_loads_with_no_verify(run_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    file = resolve_checkpoint(copy) / "model.safetensors"
    flip_last_byte(file)
    with pytest.raises(CheckpointError, match=f"{file}: sha256 differs"):
        runs.load_model(copy)
    assert cli.main(["eval", str(copy), "--batches", "1"]) == 2
    assert str(file) in capsys.readouterr().err
    assert cli.main(["eval", str(copy), "--batches", "1", "--no-verify"]) == 0
    done = file.parent / "DONE"  # DONE itself is checked against the manifest
    done.write_text(done.read_text() + " ")
    with pytest.raises(lineage.ManifestError, match=f"{done}: .* bytes where"):
        runs.load_model(copy)


def test_a_directory_without_a_manifest_loads_with_a_warning(chain_dirs, tmp_path):
    run, pruned, _ = chain_dirs
    copy = tmp_path / "pruned"
    shutil.copytree(pruned, copy)
    (copy / "manifest.json").unlink()
    with pytest.warns(lineage.ManifestWarning, match=f"{copy}: no manifest.json"):
        loaded = runs.load_model(copy)
    assert loaded.kind == runs.MODEL_DIR
    old_run = tmp_path / "run"
    shutil.copytree(run, old_run)
    (resolve_checkpoint(old_run) / "manifest.json").unlink()
    with pytest.warns(lineage.ManifestWarning, match="no manifest.json"):
        assert runs.load_model(old_run).step == 6


def test_export_writes_a_sidecar_manifest_naming_its_parent(chain_dirs, tmp_path, capsys):
    run = chain_dirs[0]
    out = tmp_path / "m.onnx"
    assert cli.main(["export", str(run), "--out", str(out)]) == 0
    manifest = json.loads((tmp_path / "m.onnx.manifest.json").read_text())
    assert manifest["kind"] == "onnx"
    assert manifest["files"] == {"m.onnx": {"bytes": out.stat().st_size, "sha256": sha256(out)}}
    ckpt = resolve_checkpoint(run)
    assert manifest["parent"]["path"] == str(ckpt.resolve())
    assert manifest["parent"]["manifest_sha256"] == sha256(ckpt / "manifest.json")
    assert manifest["producer"]["step"] == "export" and manifest["metrics"]["max_rel_err"] < 1e-4
    capsys.readouterr()
    assert cli.main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [s["kind"] for s in info["chain"]] == ["onnx", "checkpoint", "run"]
    flip_last_byte(out)
    assert cli.main(["info", str(out)]) == 2
    assert f"{out}: sha256" in capsys.readouterr().err


def test_git_commit_is_none_outside_a_work_tree_or_without_git(tmp_path, monkeypatch):
    assert lineage.git_commit(tmp_path) is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on PATH
    assert lineage.git_commit() is None


def test_git_commit_is_head_of_a_work_tree(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True)
    assert lineage.git_commit(tmp_path) == head.stdout.strip()
