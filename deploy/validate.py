"""Validate rendered manifests against the Kubernetes API schemas, offline and strict (unknown fields are
errors), with PyPI's kubernetes-validate; prints one line per problem, exit 1 if any.

    python -m deploy.validate build/k8s/rendered.yaml [--kube-version 1.29 --kube-version 1.33]

Objects of the custom resources the chart can render (Prometheus Operator, KEDA) have no schema in
Kubernetes itself: they are named as skipped, by API group, and nothing else is. Any other kind
without a schema (a typo, a removed API such as autoscaling/v2beta2) is a failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_VERSIONS = ("1.29", "1.33")
# API groups of custom resources, with who defines them.
CUSTOM_RESOURCE_GROUPS = {
    "monitoring.coreos.com": "the Prometheus Operator (ServiceMonitor, PrometheusRule)",
    "keda.sh": "KEDA (ScaledObject)",
}


def load(path: Path) -> list[dict]:
    import yaml

    return [doc for doc in yaml.safe_load_all(Path(path).read_text()) if doc]


def describe(obj: dict) -> str:
    return f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')} ({obj.get('apiVersion')})"


def validate(objects: list[dict], version: str) -> tuple[list[str], list[str]]:
    """(problems, skipped custom resources) of these objects against Kubernetes `version`."""
    import kubernetes_validate

    problems, skipped = [], []
    for obj in objects:
        group = str(obj.get("apiVersion", "")).rpartition("/")[0]
        if group in CUSTOM_RESOURCE_GROUPS:
            skipped.append(f"{describe(obj)}: a custom resource of {CUSTOM_RESOURCE_GROUPS[group]}")
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{version}: {describe(obj)}: no such kind in Kubernetes {version}")
        except kubernetes_validate.ValidationError as error:
            where = "/".join(str(p) for p in error.path) or "(root)"
            problems.append(f"{version}: {describe(obj)}: {where}: {error.message}")
    return problems, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--kube-version", action="append", dest="versions",
                        help=f"Kubernetes version (repeatable; default {' and '.join(DEFAULT_VERSIONS)})")
    args = parser.parse_args(argv)
    objects = load(args.manifest)
    all_problems = []
    for version in args.versions or DEFAULT_VERSIONS:
        problems, skipped = validate(objects, version)
        all_problems += problems
        print(f"[validate] Kubernetes {version}: {len(objects) - len(skipped)} objects checked, "
              f"{len(problems)} problems, {len(skipped)} custom resources skipped", file=sys.stderr)
        for line in skipped:
            print(f"  skipped {line}", file=sys.stderr)
    for problem in all_problems:
        print(problem)
    return 1 if all_problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
