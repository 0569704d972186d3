"""Screen Flickr8k recipe variants on one CUDA GPU: many short runs side by side, evaluated afterwards on a CPU.

    python experiments/gpu_screen.py prepare    # here: 144-px WebP copies and four wheels into .gpu/
    # there, from the repository root, with .gpu/flickr8k and .gpu/whl carried (47 MB):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH=/tmp/site
    OUT=DIR python3 experiments/gpu_screen.py auto 525 r9 r9_b64 ...    # every variant scaled to end within 525 s
    OUT=DIR python3 experiments/gpu_screen.py 0.2057 345 r9_seed1 ...   # each variant at 0.2057 x its recipe's steps

A mini-112 step is launch-bound on a GPU, so five to seven runs share an H200 at 11-23 steps/s each
(two loader workers each, 16 CPU cores). `auto` first times 300 steps of every variant side by
side, then scales all of them by one factor so the slowest ends before the deadline. Each finished
model (no checkpoints, no pictures: at most 64 MiB come back) goes into $OUT as NAME.tar.gz, to be
evaluated on the full-size photos with `python -m evaluation` (add `--no_repeat_ngram_size 2` to score
recipe 9's variants as best.json decodes: recipe 9's file saves beam 3 alone). The variants are recipe files plus
changed flags (VARIANTS); the in-training evaluations are off and 64 validation photos feed the
final report. The training photos are smaller than the originals (144 px on the short side, WebP
q80, 33 MB so that the repository and data fit the 64 MiB a GPU machine receives): say so with the
figures. `experiments/gpu_recipes.sh` runs whole recipes the same way from JPEG copies.
"""

import json
import os
import re
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REC = os.path.join(ROOT, "configuration", "recipes", "flickr8k", "")
R9 = REC + "9_mini_112_v4k_words_aug_decoder_dropout_pooled16.json"
R9_MODEL = "vision_hidden_size=248,hidden_size=168,hidden_dropout=0.1,vision_feature_select=pooled"
VARIANTS = {  # name: (recipe, flags changed)
    "r9": (R9, {}),
    "r9_seed1": (R9, {"seed": 1}),
    "r9_30k": (R9, {"max_steps": 30000}),
    "r9_b64": (R9, {"per_device_train_batch_size": 64}),
    "r9_b64_seed1": (R9, {"per_device_train_batch_size": 64, "seed": 1}),
    "r10_conv": (REC + "10_mini_112_v4k_words_aug_decoder_dropout_pooled16_convstem.json", {}),
    "r17_mim03": (REC + "17_mini_112_v4k_words_aug_decoder_dropout_pooled16_mim.json", {"aux_mim_weight": 0.3}),
    "r9_pool5": (R9, {"config_overrides": R9_MODEL + ",vision_pool_size=5"}),
    "r9_noaug": (R9, {"augment": False}),
    "r9_lr2e3": (R9, {"learning_rate": 0.002}),
}
DATA = ".gpu/flickr8k"
WHEELS = ["datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "transformers==5.24.0"]


def prepare(shared: str = os.environ.get("FLICKR8K", "../shared/data/flickr8k")) -> None:
    from PIL import Image
    from tqdm import tqdm

    if not os.path.isdir(shared):
        sys.exit(f"no Flickr8k at {shared}: set FLICKR8K to a COCO-layout folder")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                    "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                    "-d", ".gpu/whl", *WHEELS], check=True)
    os.makedirs(f"{DATA}/images", exist_ok=True)
    train, val = (json.load(open(f"{shared}/captions_{split}.json")) for split in ("train", "val"))
    val["images"] = val["images"][:64]
    ids = {image["id"] for image in val["images"]}
    val["annotations"] = [a for a in val["annotations"] if a["image_id"] in ids]
    for split, captions in (("train", train), ("val", val)):
        json.dump(captions, open(f"{DATA}/captions_{split}.json", "w"))
    for image in tqdm(train["images"] + val["images"], desc="144 px copies"):
        source = f"{shared}/images/{image['file_name']}"
        if not os.path.isfile(source):  # a FIFO would block the open for ever
            sys.exit(f"{source} is not a regular file: the caption files' images must be image files")
        photo = Image.open(source).convert("RGB")
        scale = 144 / min(photo.size)
        photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.BICUBIC)
        photo.save(f"{DATA}/images/{image['file_name']}", "WEBP", quality=80)  # the name keeps .jpg; PIL reads the content


def variant_recipe(name: str, max_steps: int) -> dict:
    """The train.py recipe of a variant at `max_steps` on the .gpu copies (its seed under "seed")."""
    path, change = VARIANTS[name]
    with open(path) as f:
        recipe = json.load(f) | change
    recipe.pop("eval_metrics", None)  # CIDEr needs pycocoevalcap; the evaluation runs afterwards, on the CPU
    recipe.update(caption_file=f"{DATA}/captions_train.json", image_dir=f"{DATA}/images", validation_caption_file=f"{DATA}/captions_val.json",
                  num_validation_examples=64, eval_strategy="no", save_steps=2000, save_total_limit=1, max_steps=max_steps,
                  warmup_steps=min(recipe["warmup_steps"], max_steps // 10))
    return recipe


def launch(name: str, max_steps: int, tag: str = "") -> subprocess.Popen:
    recipe = variant_recipe(name, max_steps)
    seed = str(recipe.pop("seed", 0))
    os.makedirs("/tmp/recipes", exist_ok=True)
    with open(f"/tmp/recipes/{name}{tag}.json", "w") as f:
        json.dump(recipe, f)
    return subprocess.Popen([sys.executable, "train.py", "--recipe", f"/tmp/recipes/{name}{tag}.json", "--output_dir", f"/tmp/runs/{name}{tag}",
                             "--dataloader_num_workers", "2", "--seed", seed, "--disable_tqdm", "true", "--logging_steps", "500"],
                            stdout=open(f"/tmp/{name}{tag}.log", "w"), stderr=subprocess.STDOUT, env=os.environ | {"OMP_NUM_THREADS": "1"})


def steps_per_second(log: str) -> float | None:
    found = re.findall(r"'train_steps_per_second': '?([\d.]+)", open(log).read())
    return float(found[-1]) if found else None


def screen(scale_arg: str, deadline: float, names: list[str]) -> None:
    t0, out = time.time(), os.environ.get("OUT", "/tmp/out")
    os.makedirs(out, exist_ok=True)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    steps = {n: VARIANTS[n][1].get("max_steps", json.load(open(VARIANTS[n][0]))["max_steps"]) for n in names}
    if scale_arg == "auto":  # 300 steps of each variant side by side, then the real runs sized to the deadline
        probes = {n: launch(n, 300, "_probe") for n in names if n != "r9_30k"}  # r9_30k steps as fast as r9
        for p in probes.values():
            p.wait()
        rates = {n: steps_per_second(f"/tmp/{n}_probe.log") for n in probes}
        print("probe steps/s (side by side):", rates, f"after {time.time() - t0:.0f}s", flush=True)
        if None in rates.values():
            sys.exit("a probe failed: " + ", ".join(f"/tmp/{n}_probe.log" for n, r in rates.items() if r is None))
        rates.setdefault("r9_30k", rates.get("r9", min(rates.values())))
        left = deadline - (time.time() - t0) - 75  # start-up, final report and tar of each run
        scale = max(0.05, min(1.0, min(0.85 * rates[n] * left / steps[n] for n in names)))
    else:
        scale = float(scale_arg)
    print(f"scale {scale:.3f}: steps", {n: int(steps[n] * scale) for n in names}, flush=True)
    procs = {n: launch(n, int(steps[n] * scale)) for n in names}
    while time.time() - t0 < deadline and any(p.poll() is None for p in procs.values()):
        time.sleep(5)
    for name, p in procs.items():
        if p.poll() is None:
            p.kill()
        print(f"== {name}: rc={p.poll()} elapsed~{time.time() - t0:.0f}s steps/s={steps_per_second(f'/tmp/{name}.log')}")
        with tarfile.open(f"{out}/{name}.tar.gz", "w:gz") as tar:
            run = f"/tmp/runs/{name}"
            for f in os.listdir(run) if os.path.isdir(run) else []:
                if not f.startswith("checkpoint-") and f not in ("runs", "samples.png", "loss_curve.png", "eval"):
                    tar.add(os.path.join(run, f), arcname=f"{name}/{f}")
            tar.add(f"/tmp/{name}.log", arcname=f"{name}/train.log")


if __name__ == "__main__":
    if sys.argv[1:2] == ["prepare"]:
        prepare()
    elif len(sys.argv) > 3:
        screen(sys.argv[1], float(sys.argv[2]), sys.argv[3:])
    else:
        sys.exit(__doc__)
