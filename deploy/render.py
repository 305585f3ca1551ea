"""Render the Helm chart offline (the Helm v4 SDK of PyPI's helm-python-sdk: no helm binary, no cluster)
into one multi-document YAML file, as `helm template` would; optionally lint it first.

    python -m deploy.render [--values FILE]... [--set KEY=VALUE]... [--out build/k8s/rendered.yaml] [--lint]

Runs in the deployment tools' environment (`make install-deploy`: .venv-deploy). A value that the
chart refuses (values.schema.json, or a template's own check) exits 1 with Helm's message.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CHART = REPO_ROOT / "deploy" / "helm" / "sdxl-triton"
DEFAULT_OUT = REPO_ROOT / "build" / "k8s" / "rendered.yaml"
KUBE_VERSION = "v1.30.0"  # what `helm lint` checks kubeVersion and deprecated APIs against


def deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def load_values(files: list[Path], settings: list[str]) -> dict:
    """The values files in order, then each --set KEY=VALUE (dotted keys; the value parsed as YAML)."""
    import yaml

    values: dict = {}
    for path in files:
        values = deep_merge(values, yaml.safe_load(Path(path).read_text()) or {})
    for setting in settings:
        key, sep, raw = setting.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {setting!r}: expected KEY=VALUE, e.g. --set gpu.product=NVIDIA-L4")
        node: dict = {}
        leaf = node
        parts = key.split(".")
        for part in parts[:-1]:
            leaf = leaf.setdefault(part, {})
        leaf[parts[-1]] = yaml.safe_load(raw)
        values = deep_merge(values, node)
    return values


def render(values: dict, name: str = "sdxl", namespace: str = "default", chart: Path = CHART,
           notes: bool = False) -> str:
    """Every non-empty template as one YAML stream, each document headed by its source template;
    `notes`: NOTES.txt (what `helm install` prints) last, as a document of comments."""
    import helm_python

    documents = helm_python.Chart.load(str(chart)).render(values, name=name, namespace=namespace, is_install=True)
    parts = []
    for source in sorted(documents):
        text = documents[source]
        if source.endswith("NOTES.txt") or not text.strip():
            continue
        parts.append(f"---\n# Source: {source}\n{text.strip()}\n")
    if notes:
        text = next((t for s, t in documents.items() if s.endswith("NOTES.txt")), "")
        parts.append("---\n# Source: NOTES.txt\n" + "".join(f"# {line}\n" for line in text.strip().splitlines()))
    return "".join(parts)


def lint(values: dict, chart: Path = CHART) -> list[str]:
    """helm lint --strict's messages for these values (empty: clean)."""
    import helm_python

    result = helm_python.lint(str(chart), values, strict=True, kube_version=KUBE_VERSION)
    severities = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}
    messages = [f"{severities.get(m.get('severity'), m.get('severity'))}: {m.get('path')}: {m.get('error')}"
                for m in result.get("messages") or [] if m.get("severity") != 1]  # INFO: "icon is recommended"
    messages += [f"ERROR: {error}" for error in result.get("errors") or []]
    return messages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.render", description=__doc__.split("\n\n")[0])
    parser.add_argument("--values", "-f", type=Path, action="append", default=[], help="values file (repeatable)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="one value, dotted key, YAML value (repeatable)")
    parser.add_argument("--name", default="sdxl", help="release name (default %(default)s)")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output file; - for stdout (default build/k8s/rendered.yaml)")
    parser.add_argument("--lint", action="store_true", help="helm lint --strict first (Kubernetes " + KUBE_VERSION + ")")
    parser.add_argument("--notes", action="store_true", help="NOTES.txt last, as comments (what helm install prints)")
    args = parser.parse_args(argv)
    try:
        import helm_python  # noqa: F401
    except ImportError:
        print("error: the Helm SDK (helm-python-sdk) is not installed here: run `make install-deploy` and use "
              ".venv-deploy/bin/python (or `make k8s-render`)", file=sys.stderr)
        return 2
    try:
        values = load_values(args.values, args.settings)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from helm_python import HelmError, disable_logging

    disable_logging()  # the SDK's own log repeats a template's failure message

    try:
        if args.lint:
            problems = lint(values)
            if problems:
                print("\n".join(problems), file=sys.stderr)
                return 1
        manifest = render(values, args.name, args.namespace, notes=args.notes)
    except HelmError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if str(args.out) == "-":
        sys.stdout.write(manifest)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(manifest)
        print(f"[k8s-render] {manifest.count('# Source:')} objects -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
