"""Run training recipes on the built-in scenes and tabulate what each one makes the model see.

    python -m benchmarks.make_it_see configuration/recipes/see/*.json --output results/see.json [-- --max_steps 10]

Each recipe is a JSON file of train.py flags (keys starting with "_" are notes; "_name" and
"_change" label the table row). Every recipe runs in its own process, one after another, so
wall times are comparable; the table (markdown) and every metric (JSON) are written at the end
and after each run, so an interrupted sweep keeps what finished.
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import time

logger = logging.getLogger("make_it_see")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_recipe(path: str, output_root: str, extra: list[str]) -> dict:
    with open(path) as f:
        recipe = json.load(f)
    name = recipe.get("_name", os.path.splitext(os.path.basename(path))[0])
    out = os.path.join(output_root, name)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--recipe", path, "--output_dir", out, *extra]
    logger.info("running %s", " ".join(cmd))
    started = time.time()
    done = subprocess.run(cmd, cwd=ROOT)
    row = {"name": name, "change": recipe.get("_change", ""), "recipe": path, "returncode": done.returncode,
           "wall_seconds": round(time.time() - started, 1)}
    metrics_file = os.path.join(out, "metrics.json")
    if done.returncode == 0 and os.path.exists(metrics_file):
        with open(metrics_file) as f:
            metrics = json.load(f)
        for key in ("train_examples_seen", "final.eval_loss", "grounding.object_recall", "grounding.object_precision",
                    "grounding.chair_i", "grounding.chair_s", "num_parameters"):
            row[key] = metrics.get(key)
        row["sample"] = metrics["samples"][0] if metrics.get("samples") else None
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| recipe | change | samples seen | wall time | val loss | recall | CHAIR-i |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("grounding.object_recall") is None:
            lines.append(f"| {r['name']} | {r['change']} | failed (exit {r['returncode']}) | | | | |")
            continue
        lines.append(
            f"| {r['name']} | {r['change']} | {r['train_examples_seen']:,} | {r['wall_seconds'] / 60:.1f} min | "
            f"{r['final.eval_loss']:.3f} | {r['grounding.object_recall']:.2f} | {r['grounding.chair_i']:.2f} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+", help="recipe JSON files")
    parser.add_argument("--output", default="see.json", help="JSON results (the markdown table goes next to it)")
    parser.add_argument("--output_root", default="outputs/see", help="where each run's folder goes")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, extra = parser.parse_args(argv[:split]), argv[split + 1 :]  # after "--": flags for every run
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
