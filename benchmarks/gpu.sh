#!/usr/bin/env bash
# NanoVLM's benchmarks on one CUDA GPU: `python -m benchmarks --device cuda` (NanoVLM in bf16 as
# train.py runs on a GPU, the peer with the Trainer's fp32 defaults, and both in bf16), JSON and
# log into $OUT. Under 8 minutes on an H100. From the repository root:
#
#   bash benchmarks/gpu.sh prepare    # on a machine with PyPI: wheels into .whl/, 256 Flickr8k JPEGs into .bench_images/
#   OUT=/some/dir bash benchmarks/gpu.sh
#
# It installs only what is missing: from .whl/ when that folder is there (a GPU machine without a
# package index: carry .whl and .bench_images to it), else from PyPI. Then `pip install -e .`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(transformers==5.24.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)

if [ "${1:-}" = prepare ]; then
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    images=(../shared/data/flickr8k/images/*.jpg)
    mkdir -p .bench_images && cp "${images[@]:0:256}" .bench_images/
    du -sh .whl .bench_images
    exit 0
fi

OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
missing=$($PY - torch accelerate matplotlib "${WHEELS[@]}" <<'EOF'
import importlib.metadata as metadata, sys
def installed(requirement):
    name, _, version = requirement.partition("==")
    try:
        found = metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return not version or found == version
print(" ".join(r for r in sys.argv[1:] if not installed(r)))
EOF
)
if [ -n "$missing" ] && [ -d .whl ]; then
    echo "installing from .whl/ (missing: $missing)"
    $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
elif [ -n "$missing" ]; then
    echo "installing from PyPI: $missing"
    $PY -m pip install -q $missing
fi
if ! $PY -c "import pycocoevalcap" 2>/dev/null; then
    # train.py imports the caption metrics at its top; the benchmarks never call them, and their
    # wheel (104 MB with its Java jars) is too big to carry: empty stand-ins let train.py import.
    stub=$(mktemp -d)
    for metric in bleu:Bleu cider:Cider rouge:Rouge; do
        mkdir -p "$stub/pycocoevalcap/${metric%%:*}"
        touch "$stub/pycocoevalcap/__init__.py" "$stub/pycocoevalcap/${metric%%:*}/__init__.py"
        echo "class ${metric##*:}: pass" > "$stub/pycocoevalcap/${metric%%:*}/${metric%%:*}.py"
    done
    export PYTHONPATH=$stub${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -m pip install -q --no-deps --no-build-isolation -e . || echo "pip install -e . failed: running from the source tree"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"

images=${IMAGE_DIR:-.bench_images}
[ -d "$images" ] || images=../shared/data/flickr8k/images
PYTHONUNBUFFERED=1 $PY -m benchmarks --device cuda --output "$OUT/bench_gpu.json" --image_dir "$images" \
    --train_steps 20 --train_seconds 2 --train_repeats 2 --warmup_steps 5 --generate_calls 3 3 --matmul_sizes 4096 8192 \
    --matmul_seconds 1 --bf16_steps 20 --ttq_seconds 60 --ttq_eval_seconds 15 --ttq_train_examples 20000 \
    --ttq_validation_examples 64 2>&1 | tee "$OUT/bench_gpu.log"
