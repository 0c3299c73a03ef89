#!/usr/bin/env python3
"""Offline checks of rendered Kubernetes manifests (multi-document YAML files).

  validate.py schema FILE...   every document against its schema: custom resources against
                               schemas/crds/ (strict: a field the schema does not name is an
                               error), core kinds with kubernetes-validate (K8S_VERSION)
  validate.py cel FILE...      the CRDs' x-kubernetes-validations rules, evaluated with cel-python
                               (transition rules, which need oldSelf, are skipped)

Prints one line per document (ok/FAIL) or per broken rule; exits 1 when anything failed."""
import json
import os
import sys

import yaml

SCHEMA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schemas", "crds")
K8S_VERSION = os.environ.get("K8S_VERSION", "1.32.0")


def documents(paths):
    for path in paths:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    yield path, doc


def crd_schema(doc):
    """The CRD schema for this document's apiVersion and kind, or None for core kinds."""
    group, _, version = doc.get("apiVersion", "").rpartition("/")
    if not group:
        return None
    path = os.path.join(SCHEMA_DIR, f"{doc.get('kind', '')}_{group}_{version}.json".lower())
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def closed(schema):
    """Makes every object schema refuse unknown fields, as the API server's pruning would drop them."""
    if isinstance(schema, dict):
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        for value in schema.values():
            closed(value)
    elif isinstance(schema, list):
        for value in schema:
            closed(value)
    return schema


def check_schemas(paths):
    import jsonschema
    import kubernetes_validate

    failures = 0
    for path, doc in documents(paths):
        label = f"{path}: {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')} ({doc.get('apiVersion')})"
        schema = crd_schema(doc)
        if schema is not None:
            schema = closed(schema)
            # The CRD schema covers spec/status; apiVersion, kind and metadata are the API's own.
            schema.setdefault("properties", {}).update(
                apiVersion={"const": doc["apiVersion"]},
                kind={"const": doc["kind"]},
                metadata={"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
            )
            errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
            for e in errors:
                print(f"FAIL {label}: {'.'.join(map(str, e.path)) or '<root>'}: {e.message}")
            failures += len(errors)
            if not errors:
                print(f"ok   {label} [CRD schema]")
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            print(f"ok   {label} [Kubernetes {K8S_VERSION}]")
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError, KeyError, TypeError) as e:
            failures += 1
            print(f"FAIL {label}: {getattr(e, 'message', None) or e!r}")
    return failures


def check_cel(paths):
    import celpy

    env = celpy.Environment()

    def walk(schema, value, where, out):
        if not isinstance(schema, dict) or value is None:
            return
        for rule in schema.get("x-kubernetes-validations", []):
            if "oldSelf" in rule["rule"]:
                continue
            try:
                program = env.program(env.compile(rule["rule"]))
                result = program.evaluate({"self": celpy.json_to_cel(value)})
                holds = result is True or (isinstance(result, celpy.celtypes.BoolType) and bool(result))
                if not holds:
                    out.append(f"{where or '<root>'}: {rule.get('message') or rule['rule']}")
            except Exception as e:  # an unsupported rule must show, not pass silently
                out.append(f"{where or '<root>'}: cannot evaluate {rule['rule']!r}: {type(e).__name__}")
        if isinstance(value, dict):
            extra = schema.get("additionalProperties")
            for key, sub in value.items():
                sub_schema = schema.get("properties", {}).get(key) or (extra if isinstance(extra, dict) else None)
                walk(sub_schema, sub, f"{where}.{key}", out)
        elif isinstance(value, list):
            for i, sub in enumerate(value):
                walk(schema.get("items"), sub, f"{where}[{i}]", out)

    failures = 0
    for _, doc in documents(paths):
        schema = crd_schema(doc)
        if schema is None:
            continue
        out = []
        walk(schema, doc, "", out)
        for line in out:
            print(f"CEL  {doc['kind']}/{doc['metadata']['name']}: {line}")
        failures += len(out)
    return failures


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in ("schema", "cel"):
        print(__doc__, file=sys.stderr)
        return 2
    check = check_schemas if sys.argv[1] == "schema" else check_cel
    return 1 if check(sys.argv[2:]) else 0


if __name__ == "__main__":
    sys.exit(main())
