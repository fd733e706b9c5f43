#!/usr/bin/env bash
# A scratch interpreter with transformers 4.46 (the version the paper's code patches) for
# scripts/bench_side_by_side.py --transformers4-python: a venv at ${1:-/tmp/tf446} holding
# only transformers 4.46 and the two packages whose versions it pins (huggingface-hub < 1,
# tokenizers 0.20); torch and everything else come from the project's .venv through a .pth
# file placed after the venv's own site-packages, so the same torch build runs both sides.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-/tmp/tf446}"
python3 -m venv "$dest"
"$dest/bin/python" -m pip install --quiet --no-deps "transformers==4.46.*" \
    "huggingface-hub>=0.23.2,<1.0" "tokenizers>=0.20,<0.21"
site=$("$dest/bin/python" -c "import site; print(site.getsitepackages()[0])")
main=$(.venv/bin/python -c "import site; print(site.getsitepackages()[0])")
echo "$main" > "$site/zz_vtm_jax_venv.pth"
"$dest/bin/python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
