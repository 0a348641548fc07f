#!/usr/bin/env bash
# Kiln setup: system packages (apt), .venv with Kiln's pinned Python
# dependencies, and the embedded model. Idempotent; a second run takes a second.
#   bash setup.sh            set up (what README command 1 and 2 start with)
#   PYTHON=python3.12 bash setup.sh   choose the interpreter for .venv (>= 3.11)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PYTHON=${PYTHON:-python3}
VENV=.venv
# torch first, pinned: PyPI's default Linux torch is a multi-GB CUDA build;
# 2.13.0 resolves to the CPU wheel here, and pyproject's range accepts it.
TORCH_REQ="torch==2.13.0"
# aimet-onnx (the quantize stage's `engine: aimet`) without its dependencies: pyproject's `aimet`
# extra lists them, less onnx2torch/torchvision (see there).
AIMET_REQ="aimet-onnx==2.42.0"
# System packages Kiln's stages call: the aarch64 cross toolchain, qemu-user
# (runs aarch64 binaries here), ccache (warm llama.cpp rebuilds), cmake, and
# bible-kjv (public-domain KJV text for calibration/evaluation), graphviz (the report's stage graph),
# chromium (the test that loads the report page in a real browser).
APT_PACKAGES=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user-static ccache cmake make bible-kjv graphviz chromium)

log() { printf 'setup: %s\n' "$*"; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  log "apt: installing ${missing[*]}"
  $sudo apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "setup: Python >= 3.11 needed (set PYTHON=...)" >&2; exit 1; }

stamp="$VENV/.kiln-setup"
want=$(cat pyproject.toml setup.sh | sha256sum | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  log ".venv is up to date"
else
  [ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
  log "installing Python dependencies into $VENV"
  # --no-compile: pip would byte-compile all ~21000 modules of the environment up front;
  # Python compiles the few thousand that Kiln imports on first use instead
  pip_install=("$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-compile)
  "${pip_install[@]}" "$TORCH_REQ"
  mapfile -t deps < <("$VENV/bin/python" - <<'PY'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
extra = p["optional-dependencies"]
print("\n".join(p["dependencies"] + extra["test"] + extra["aimet"] + extra["remote"] + extra["ray"]))
PY
)
  "${pip_install[@]}" "$TORCH_REQ" "${deps[@]}"
  "${pip_install[@]}" --no-deps "$AIMET_REQ"
  echo "$want" > "$stamp"
fi

# Bytecode: where PYTHONDONTWRITEBYTECODE=1 is set (the machines Kiln is developed on set it), every stage process
# would compile torch's and transformers' sources again (~10 s a process). The venv's interpreter
# writes bytecode all the same, under .venv/pycache (sys.pycache_prefix), never beside the sources.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
printf '%s\n' "import os, sys; sys.dont_write_bytecode = False; sys.pycache_prefix = sys.pycache_prefix or os.path.join(sys.prefix, 'pycache')" \
  > "$site/kiln-bytecode.pth"

"$VENV/bin/python" -m pipeline fetch
