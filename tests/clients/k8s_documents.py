"""Reads a rendered Kubernetes YAML stream (kubectl kustomize's output) and prints its documents as
one JSON array, for tests/deploy.rs to look into. Every ServiceMonitor (a Prometheus Operator CRD,
which kubernetes-validate has no schema for) is checked against the operator's models, strictly: a
field the model does not know is dropped by its round trip, and named here as an error.

Usage: k8s_documents.py FILE > documents.json; exit 1 naming what is wrong.
"""

import json
import sys

import yaml
from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor


def unknown(given, kept, path=""):
    """The paths in `given` that the round trip did not keep."""
    if isinstance(given, dict) and isinstance(kept, dict):
        for key, value in given.items():
            if key not in kept:
                yield f"{path}.{key}"
            else:
                yield from unknown(value, kept[key], f"{path}.{key}")
    elif isinstance(given, list) and isinstance(kept, list):
        for i, (a, b) in enumerate(zip(given, kept)):
            yield from unknown(a, b, f"{path}[{i}]")
    elif given != kept:
        yield f"{path} (changed: {given!r} -> {kept!r})"


def main():
    with open(sys.argv[1]) as f:
        documents = [d for d in yaml.safe_load_all(f) if d is not None]
    problems = []
    for doc in documents:
        if doc.get("kind") != "ServiceMonitor":
            continue
        name = doc.get("metadata", {}).get("name")
        try:
            model = ServiceMonitor.model_validate(doc)
        except Exception as e:  # pydantic's ValidationError names every field
            problems.append(f"ServiceMonitor {name}: {e}")
            continue
        kept = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
        for path in unknown(doc, kept):
            problems.append(f"ServiceMonitor {name}: unknown field {path}")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        sys.exit(1)
    json.dump(documents, sys.stdout)


main()
