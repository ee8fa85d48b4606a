"""`perfml register` against a real local MLflow store (sqlite in tmp_path), then the registered
versions opened by URI (models:/NAME/VERSION, models:/NAME@ALIAS) by `perfml eval` and `info`;
without MLflow, a clear error naming the extra."""

from __future__ import annotations

import json
import sys

import pytest

from perfml import cli, registry, runs


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A tracking URI in tmp_path, also the environment's (commands that resolve URIs read
    it), and a private download cache."""
    pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("PERFML_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory but the store
    return uri


def test_register_then_eval_by_version_and_alias(chain_dirs, store, tmp_path, capsys):
    _, pruned, quantized = chain_dirs
    args = ["--tracking-uri", store, "--json"]
    assert cli.main(["register", str(pruned), "--name", "tiny", *args]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["version"] == 1 and first["uri"] == "models:/tiny/1" and first["alias"] is None
    assert (
        cli.main(["register", str(quantized), "--name", "tiny", "--stage", "production", *args])
        == 0
    )
    second = json.loads(capsys.readouterr().out)
    assert second["version"] == 2 and second["alias"] == "production"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlartifacts", "mlflow.db"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store, registry_uri=store)
    version = client.get_model_version_by_alias("tiny", "production")
    assert int(version.version) == 2
    manifest = json.loads((quantized / "manifest.json").read_text())
    assert version.tags["perfml.producer"] == "quantize Int8WeightOnly"
    assert version.tags["perfml.parent_manifest_sha256"] == manifest["parent"]["manifest_sha256"]
    assert float(version.tags["perfml.metric.ppl_after"]) == manifest["metrics"]["ppl_after"]
    run = client.get_run(second["run_id"])
    assert run.data.metrics["ppl_after"] == manifest["metrics"]["ppl_after"]

    expected = {}
    for name, folder in (("1", pruned), ("2", quantized)):
        assert cli.main(["eval", str(folder), "--batches", "1", "--json"]) == 0
        expected[name] = json.loads(capsys.readouterr().out)["val_loss"]
    for uri, want in (
        ("models:/tiny/1", "1"),
        ("models:/tiny/2", "2"),
        ("models:/tiny@production", "2"),
    ):
        assert cli.main(["eval", uri, "--batches", "1", "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["val_loss"] == pytest.approx(expected[want], rel=1e-6)
        assert result["path"] == str(tmp_path / "cache" / "registry" / "tiny" / want)
    # the download is a verified model directory whose lineage still reaches the run
    assert cli.main(["info", "models:/tiny@production", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [s["kind"] for s in info["chain"]] == ["model", "model", "checkpoint", "run"]
    assert info["verified"]


def test_resolve_names_a_missing_version_or_alias_and_a_bad_uri(chain_dirs, store):
    with pytest.raises(registry.RegistryError, match="models:/nothing/3: not found"):
        registry.resolve("models:/nothing/3")
    with pytest.raises(registry.RegistryError, match="not a registered model URI"):
        registry.resolve("models:/a/b/c")
    with pytest.raises(runs.RunError, match="models:/nothing@production: not found"):
        runs.load_model("models:/nothing@production")


def test_register_refuses_a_run_and_a_bad_stage(chain_dirs, store, capsys):
    run = chain_dirs[0]
    assert cli.main(["register", str(run), "--name", "tiny"]) == 2
    assert "not a model directory" in capsys.readouterr().err
    with pytest.raises(registry.RegistryError, match="stage must be one of staging, production"):
        registry.register(chain_dirs[1], "tiny", stage="archived")


def test_without_mlflow_the_error_names_the_extra(chain_dirs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    assert cli.main(["register", str(chain_dirs[2]), "--name", "tiny"]) == 2
    assert "pip install perfml[mlflow]" in capsys.readouterr().err
    assert cli.main(["eval", "models:/tiny/1"]) == 2
    assert "pip install perfml[mlflow]" in capsys.readouterr().err
