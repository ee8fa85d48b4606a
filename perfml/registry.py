"""A model registry on MLflow: register a model directory, open a registered version by URI.

    perfml.registry.register("runs/tiny/pruned-magnitude-quantized-int8", "tiny",
                             stage="production")          # -> {"name", "version", "run_id", ...}
    perfml.registry.resolve("models:/tiny/1")          # -> a local directory (downloaded)
    perfml.registry.resolve("models:/tiny@production")

register() verifies the directory against its manifest (perfml.lineage), logs it as the artifact
`model` of a new MLflow run (its metrics as run metrics), and creates a version of the registered
model NAME whose tags hold the metrics and the lineage (producer, parent manifest hash, data
fingerprint, git commit). Stages are deprecated in MLflow: `stage` sets the version alias
"staging" or "production" instead, so `models:/NAME@production` names it.

The tracking URI is the one given, else MLFLOW_TRACKING_URI, else DEFAULT_TRACKING_URI: a
sqlite database `mlflow.db` in the current directory (MLflow 3 deprecates the `./mlruns` file
store), with the artifacts in `mlartifacts/` beside the database.

resolve() downloads the version's files once into the cache, PERFML_CACHE (default
XDG_CACHE_HOME/perfml, else ~/.cache/perfml), under registry/NAME/VERSION, and returns that
directory; a cached copy whose manifest still verifies is reused. perfml.runs.load_model calls it
for any "models:/" string, so every command that takes a model directory takes such a URI.

MLflow is optional: without it these raise RegistryError naming `pip install perfml[mlflow]`.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ARTIFACT_PATH = "model"
EXPERIMENT = "perfml-registry"
STAGES = ("staging", "production")
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))/?$")


class RegistryError(ValueError):
    """MLflow missing, a bad models:/ URI, an unknown name, version or alias, or a directory
    that cannot be registered; the message says which."""


def _mlflow() -> Any:
    try:
        import mlflow
    except ImportError:
        raise RegistryError(
            "the model registry needs MLflow, which is not installed: pip install perfml[mlflow]"
        ) from None
    return mlflow


def tracking_uri(uri: str | None = None) -> str:
    """The tracking URI used: `uri`, else MLFLOW_TRACKING_URI, else DEFAULT_TRACKING_URI."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _client(uri: str | None) -> tuple[Any, str]:
    _mlflow()
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _experiment(client: Any, uri: str) -> str:
    """The id of the registry's experiment; with a sqlite store its artifacts go beside the
    database file (MLflow's default would be a folder in the current directory)."""
    found = client.get_experiment_by_name(EXPERIMENT)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return client.create_experiment(EXPERIMENT, artifact_location=location)


def _tags(manifest: dict[str, Any]) -> dict[str, str]:
    from perfml import lineage

    parent = manifest.get("parent") or {}
    origin = manifest.get("lineage") or {}
    tags = {
        "perfml.kind": manifest["kind"],
        "perfml.producer": lineage.describe_producer(manifest.get("producer")),
        "perfml.parent": str(parent.get("path")),
        "perfml.parent_manifest_sha256": str(parent.get("manifest_sha256")),
        "perfml.run": str(origin.get("run")),
        "perfml.checkpoint": str(origin.get("checkpoint")),
        "perfml.data_fingerprint": str(manifest.get("data_fingerprint")),
        "perfml.git_commit": str(manifest.get("git_commit")),
        "perfml.version": str((manifest.get("versions") or {}).get("perfml")),
    }
    for key, value in (manifest.get("metrics") or {}).items():
        tags[f"perfml.metric.{key}"] = str(value)
    return tags


def register(
    path: str | Path,
    name: str,
    *,
    stage: str | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Log model directory `path` as an MLflow run's artifact and register it as a new version
    of `name` (stage: the alias "staging" or "production"). Returns {"name", "version",
    "run_id", "alias", "uri", "tracking_uri"}."""
    from perfml import lineage

    if stage is not None and stage not in STAGES:
        raise RegistryError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    if not re.fullmatch(r"[\w.-]+", name):
        raise RegistryError(f"name {name!r}: use letters, digits, '.', '_' and '-' only")
    path = Path(path)
    if lineage.kind_of(path) != lineage.MODEL:
        raise RegistryError(
            f"{path}: not a model directory (perfml quantize / prune write one, with "
            "perfml_model.json): only model directories are registered"
        )
    manifest = lineage.verify(path, warn=False)
    if manifest is None:
        raise RegistryError(
            f"{path}: no {lineage.MANIFEST_FILE} (written before manifests existed); write it "
            "again with perfml quantize / prune to register it"
        )
    client, uri = _client(tracking_uri)
    from mlflow.exceptions import MlflowException

    try:
        run = client.create_run(_experiment(client, uri), run_name=f"register-{name}")
        run_id = run.info.run_id
        client.log_artifacts(run_id, str(path), ARTIFACT_PATH)
        for key, value in (manifest.get("metrics") or {}).items():
            if isinstance(value, (int, float)):
                client.log_metric(run_id, key, float(value))
        tags = _tags(manifest)
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        client.set_terminated(run_id)
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name, description="perfml model directory")
        version = client.create_model_version(
            name, source=f"{run.info.artifact_uri}/{ARTIFACT_PATH}", run_id=run_id, tags=tags
        )
        if stage is not None:
            client.set_registered_model_alias(name, stage, version.version)
    except MlflowException as exc:
        raise RegistryError(f"registering {path} as {name!r} at {uri}: {exc}") from None
    return {
        "name": name,
        "version": int(version.version),
        "run_id": run_id,
        "alias": stage,
        "uri": f"models:/{name}/{version.version}",
        "tracking_uri": uri,
    }


def cache_dir() -> Path:
    """Where resolve() keeps downloaded versions: PERFML_CACHE, else XDG_CACHE_HOME/perfml,
    else ~/.cache/perfml; then registry/."""
    root = os.environ.get("PERFML_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = str(Path(xdg) / "perfml") if xdg else str(Path.home() / ".cache" / "perfml")
    return Path(root) / "registry"


def parse_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, version, alias) of "models:/NAME/VERSION" or "models:/NAME@ALIAS"."""
    match = _URI.match(uri)
    if match is None:
        raise RegistryError(
            f"{uri!r}: not a registered model URI (models:/NAME/VERSION or models:/NAME@ALIAS)"
        )
    return match["name"], match["version"], match["alias"]


def resolve(uri: str, *, tracking_uri: str | None = None) -> Path:
    """The local directory of registered model `uri` (models:/NAME/VERSION, models:/NAME@ALIAS),
    downloaded into cache_dir() on first use."""
    from perfml import lineage

    name, version, alias = parse_uri(uri)
    client, used = _client(tracking_uri)
    from mlflow.exceptions import MlflowException

    try:
        if alias is not None:
            found = client.get_model_version_by_alias(name, alias)
        else:
            found = client.get_model_version(name, version)
    except MlflowException as exc:
        raise RegistryError(f"{uri}: not found in the registry at {used}: {exc}") from None
    dest = cache_dir() / name / str(found.version)
    if dest.is_dir():
        try:
            if lineage.verify(dest, warn=False) is not None:
                return dest
        except lineage.ManifestError:
            pass
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        import mlflow.artifacts

        got = mlflow.artifacts.download_artifacts(
            artifact_uri=found.source, dst_path=str(tmp), tracking_uri=used
        )
        os.replace(got, dest)
    except MlflowException as exc:
        raise RegistryError(f"{uri}: cannot download version {found.version}: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
