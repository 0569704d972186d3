#!/usr/bin/env bash
# Several Flickr8k recipes at once on one CUDA GPU. A mini-112 step is launch-bound on a GPU, so
# three runs share an H200 at ~32 steps/s each (4 loader workers each, 16 CPU cores): three
# 11,000-12,000-step runs take ~7 minutes. Each finished model (no checkpoints) goes into $OUT as
# NAME.tgz, to be evaluated on the full-size photos with `python -m evaluation`. From the repository root:
#
#   bash experiments/gpu_recipes.sh prepare    # here: the photos at 144 px and three wheels into .gpu/
#   OUT=/some/dir bash experiments/gpu_recipes.sh 'NAME|RECIPE|TRAIN.PY FLAGS' ...
#   e.g. 'r8_11k|configuration/recipes/flickr8k/8_mini_112_v4k_words_aug_decoder_dropout.json|--max_steps 11000 --seed 1'
#
# A GPU machine without the data or a package index gets the repository alone (64 MiB here), so
# `prepare` writes the 6,090 training photos and the first 256 validation photos (the in-training
# evaluations' photos) at 144 px on the short side (JPEG q85, 47 MB; a recipe's crops then still
# shrink to 112 px) with their caption files into .gpu/data, and datasets' wheels into .gpu/whl.
# Carry .gpu to the machine. The training photos are smaller than the originals: say so with the
# figures.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SHARED=${FLICKR8K:-../shared/data/flickr8k}

if [ "${1:-}" = prepare ]; then
    [ -d "$SHARED" ] || { echo "no Flickr8k at $SHARED: set FLICKR8K to a COCO-layout folder"; exit 1; }
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .gpu/whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    site=$($PY -c "import pycocoevalcap; print(list(pycocoevalcap.__path__)[0])")
    mkdir -p .gpu/site/pycocoevalcap && touch .gpu/site/pycocoevalcap/__init__.py  # the pure-Python scorers, not the 100 MB of jars
    cp -r "$site"/bleu "$site"/cider "$site"/rouge .gpu/site/pycocoevalcap/
    $PY - "$SHARED" .gpu/data <<'PYEOF'
import json, os, sys
from PIL import Image
from tqdm import tqdm
src, dst = sys.argv[1:]
os.makedirs(f"{dst}/images", exist_ok=True)
train, val = (json.load(open(f"{src}/captions_{split}.json")) for split in ("train", "val"))
first = sorted(val["images"], key=lambda image: image["id"])[:256]  # the loader's order
ids = {image["id"] for image in first}
json.dump(train, open(f"{dst}/captions_train.json", "w"))
json.dump({**val, "images": first, "annotations": [a for a in val["annotations"] if a["image_id"] in ids]},
          open(f"{dst}/captions_val.json", "w"))
for image in tqdm(train["images"] + first, desc="144 px copies"):
    out = f"{dst}/images/{image['file_name']}"
    if not os.path.exists(out):
        photo = Image.open(f"{src}/images/{image['file_name']}").convert("RGB")
        scale = 144 / min(photo.size)
        photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.BICUBIC).save(out, "JPEG", quality=85)
PYEOF
    du -sh --apparent-size .gpu
    exit 0
fi

OUT=${OUT:-outputs/gpu_recipes}
mkdir -p "$OUT" /tmp/gpu_recipes
if ! $PY -c "import datasets" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_site .gpu/whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/gpu_site:$PWD/.gpu/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" || exit 1
data=.gpu/data
start=$(date +%s)
for spec in "$@"; do
    IFS='|' read -r name recipe flags <<< "$spec"
    # shellcheck disable=SC2086  # the flags split into words on purpose
    ( timeout "${DEADLINE:-530}" $PY train.py --recipe "$recipe" --caption_file $data/captions_train.json \
          --validation_caption_file $data/captions_val.json --image_dir $data/images --dataloader_num_workers "${WORKERS:-4}" \
          --overwrite_output_dir true --output_dir /tmp/gpu_recipes/"$name" $flags > /tmp/gpu_recipes/"$name".log 2>&1
      echo "$name: exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT"/status.txt ) &
done
while [ -n "$(jobs -r)" ]; do sleep 30; echo "$(( $(date +%s) - start )) s: GPU $(nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader 2>/dev/null)"; done
for spec in "$@"; do
    name=${spec%%|*}; dir=/tmp/gpu_recipes/$name
    grep -o "'train_runtime[^}]*" "$dir".log | tail -1
    cp "$dir".log "$dir"/train.log
    [ -f "$dir"/model.safetensors ] && tar czf "$OUT/$name.tgz" --exclude='checkpoint-*' -C /tmp/gpu_recipes "$name"
done
ls -la "$OUT"
