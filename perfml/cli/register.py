"""`perfml register DIR --name NAME`: a model directory as a new version of a registered model
in MLflow (perfml.registry; needs the mlflow extra), its metrics and lineage as tags, --stage as
the version alias."""

from __future__ import annotations

import argparse
import json

from perfml.cli._common import UsageError

HELP = "register a model directory in MLflow's model registry (metrics and lineage as tags)"
STAGES = ("staging", "production")  # perfml.registry.STAGES
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # perfml.registry.DEFAULT_TRACKING_URI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="DIR", help="a model directory (perfml quantize / prune)")
    p.add_argument("--name", required=True, help="the registered model's name")
    p.add_argument(
        "--stage",
        choices=STAGES,
        help="set this alias on the new version (models:/NAME@ALIAS); MLflow's stages are "
        "deprecated, so the stage is an alias (default: no alias)",
    )
    p.add_argument(
        "--tracking-uri",
        metavar="URI",
        help=f"the MLflow store (default: MLFLOW_TRACKING_URI, else {DEFAULT_TRACKING_URI} in "
        "the current directory)",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args: argparse.Namespace) -> int:
    from perfml import lineage, registry

    try:
        result = registry.register(
            args.path, args.name, stage=args.stage, tracking_uri=args.tracking_uri
        )
    except (registry.RegistryError, lineage.ManifestError) as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(result))
    else:
        alias = f" (alias {result['alias']}: models:/{result['name']}@{result['alias']})"
        print(
            f"registered {args.path} as {result['uri']}{alias if result['alias'] else ''} "
            f"in {result['tracking_uri']} (MLflow run {result['run_id']})"
        )
    return 0
