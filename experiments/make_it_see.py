"""Run training recipes and tabulate what each one makes the model see (scenes or photos).

    python -m experiments.make_it_see configuration/recipes/see/*.json --output results/see.json [-- --max_steps 10]
    python -m experiments.make_it_see configuration/recipes/flickr8k/*.json --output results/photos.json

Each recipe is a JSON file of train.py flags (keys starting with "_" are notes; "_name" and
"_change" label the table row). Every recipe runs in its own process, one after another, so
wall times are comparable; the table (markdown) and every metric (JSON) are written at the end
and after each run, so an interrupted sweep keeps what finished. Each run has its own folder:
a finished run (metrics.json there) is not run again, a stopped one resumes from its newest
checkpoint (a two-stage recipe, one with a "then" object, from its current stage's). A recipe on
COCO-layout data is then evaluated with `python -m evaluation` on every image of its validation
file (caption metrics, the shuffled-image loss gap, distinct captions).
"""

import glob
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from evaluation.report import markdown_table

logger = logging.getLogger(__name__)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_recipe(path: str, output_root: str, extra: list[str]) -> dict:
    with open(path) as f:
        recipe = json.load(f)
    name = recipe.get("_name", os.path.splitext(os.path.basename(path))[0])
    out = os.path.join(output_root, name)
    metrics_file = os.path.join(out, "metrics.json")
    row = {"name": name, "change": recipe.get("_change", ""), "recipe": path, "output_dir": out}
    if os.path.exists(metrics_file):
        logger.info("%s finished before: %s", name, metrics_file)
        row["returncode"] = 0
    else:
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--recipe", path, "--output_dir", out, *extra]
        first_stage = os.path.join(out, "stage-1")  # a two-stage recipe's first stage (train.FIRST_STAGE)
        if glob.glob(os.path.join(out, "checkpoint-*")) or glob.glob(os.path.join(first_stage, "checkpoint-*")):
            cmd += ["--resume_from_checkpoint", "latest"]
        elif os.path.isdir(out) and os.listdir(out):  # stopped before its first checkpoint: start it afresh
            cmd += ["--overwrite_output_dir", "true"]
        logger.info("running %s", " ".join(cmd))
        row["returncode"] = subprocess.run(cmd, cwd=ROOT).returncode
    if row["returncode"] != 0 or not os.path.exists(metrics_file):
        return row
    with open(metrics_file) as f:
        metrics = json.load(f)
    for key in ("train_examples_seen", "wall_seconds", "final.eval_loss", "grounding.object_recall", "grounding.object_precision",
                "grounding.chair_i", "grounding.chair_s", "num_parameters"):
        row[key] = metrics.get(key)
    if recipe.get("scenes_style") == "long":  # what a long description says about where things are
        row.update({key: metrics.get(key) for key in LONG_KEYS})
    if metrics.get("stages"):  # a two-stage recipe: each stage's wall time, steps and samples
        row["stages"] = metrics["stages"]
    row["sample"] = metrics["samples"][0] if metrics.get("samples") else None
    if recipe.get("dataset") == "coco" and recipe.get("validation_caption_file"):
        row.update(evaluate_photos(recipe, out))
    return row


def evaluate_photos(recipe: dict, out: str) -> dict:
    """`python -m evaluation` captions part on every validation image (kept in OUT/eval)."""
    report_file = os.path.join(out, "eval", "report.json")
    if not os.path.exists(report_file):
        cmd = [sys.executable, "-m", "evaluation", "--model", out, "--dataset", "coco", "--parts", "captions",
               "--caption_file", recipe["validation_caption_file"], "--image_dir", recipe["image_dir"],
               "--caption_tokenizer", "simple", "--output", os.path.join(out, "eval")]
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            return {"evaluation": "failed"}
    with open(report_file) as f:
        metrics = json.load(f)["metrics"]
    keys = ("captions.bleu4", "captions.cider_d", "image_use.image_gap", "image_use.unique_caption_share")
    return {key: metrics.get(key) for key in keys}


# (header, metric key, format) of the columns after recipe, change, samples seen and wall time
SCENES_COLUMNS = [("val loss", "final.eval_loss", "{:.3f}"), ("recall", "grounding.object_recall", "{:.2f}"),
                  ("CHAIR-i", "grounding.chair_i", "{:.2f}")]
LONG_COLUMNS = [("val loss", "final.eval_loss", "{:.3f}"), ("recall", "grounding.object_recall", "{:.3f}"),
                ("CHAIR-i", "grounding.chair_i", "{:.3f}"), ("place acc. (chance)", "grounding.place_accuracy", "{:.3f}"),
                ("places / description", "grounding.place_claims_per_description", "{:.2f}"),
                ("relation acc.", "grounding.relation_accuracy", "{:.2f}"),
                ("relations / description", "grounding.relation_claims_per_description", "{:.2f}"),
                ("repeat a sentence", "repetition.repeat_description_share", "{:.1%}")]
LONG_KEYS = ("grounding.place_accuracy", "grounding.place_chance", "grounding.place_row_accuracy",
             "grounding.place_column_accuracy", "grounding.place_claims_per_description", "grounding.relation_accuracy",
             "grounding.relation_chance", "grounding.relation_claims", "grounding.relation_claims_per_description",
             "repetition.repeat_description_share", "repetition.repeat_sentence_share")
PHOTOS_COLUMNS = [("val loss", "final.eval_loss", "{:.3f}"), ("image gap (nats/token)", "image_use.image_gap", "{:.3f}"),
                  ("distinct captions", "image_use.unique_caption_share", "{:.1%}"), ("BLEU-4", "captions.bleu4", "{:.3f}"),
                  ("CIDEr-D", "captions.cider_d", "{:.3f}")]


def markdown(rows: list[dict]) -> str:
    if any("captions.cider_d" in r for r in rows):
        columns = PHOTOS_COLUMNS
    else:
        columns = LONG_COLUMNS if any("grounding.place_accuracy" in r for r in rows) else SCENES_COLUMNS
    header = ["recipe", "change", "samples seen", "wall time", *(name for name, _, _ in columns)]
    cells = []
    for r in rows:
        if any(r.get(key) is None for _, key, _ in columns):
            cells.append([r["name"], r["change"], f"failed (exit {r.get('returncode')})", *[""] * (len(header) - 3)])
            continue
        values = [fmt.format(r[key]) for _, key, fmt in columns]
        if "grounding.place_chance" in r:  # the place accuracy beside what guessing the commonest place scores
            i = [key for _, key, _ in columns].index("grounding.place_accuracy")
            values[i] += f" ({r['grounding.place_chance']:.3f})"
        cells.append([r["name"], r["change"], f"{r['train_examples_seen']:,}", f"{r['wall_seconds'] / 60:.1f} min", *values])
    return markdown_table(header, cells)


@dataclass
class SweepArguments:
    output: str = field(default="see.json", metadata={"help": "JSON results (the markdown table goes next to it)"})
    output_root: str = field(default="outputs/see", metadata={"help": "where each run's folder goes"})


def main(argv=None):
    parser = HfArgumentParser(SweepArguments, description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+", help="recipe JSON files")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args, rest = parser.parse_args_into_dataclasses(args=argv[:split])
    extra = argv[split + 1 :]  # after "--": train.py flags for every run
    args.recipes = rest.recipes
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rows = []
    for path in args.recipes:
        rows.append(run_recipe(path, args.output_root, extra))
        with open(args.output, "w") as f:
            json.dump({"machine": os.uname().nodename, "cpus": os.cpu_count(), "runs": rows}, f, indent=2)
        with open(os.path.splitext(args.output)[0] + ".md", "w") as f:
            f.write(markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
