"""How runs learned, side by side: the evaluations train.py logged at each step, of one or more runs.

    python -m experiments.progress outputs/flickr8k-best outputs/flickr8k-6 --output results/photos_progress.json

Reads each run folder's `samples.jsonl` (one line per evaluation: the step, the captions of the fixed
sample pictures and the `--eval_metrics` figures, e.g. `eval_cider_d`, `eval_image_gap`,
`eval_unique_caption_share` or `eval_object_recall`) and writes, next to `--output`, a markdown table
(a row per step, a column per run and metric) and a plot (each metric against the step, a line per
run). Runs compare at equal steps; with `--step_cost` (seconds a step, or each run's cost relative to
the first) the plot's x axis becomes training time instead.
"""

import json
import os
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from evaluation.report import markdown_table

SKIP = {"step", "captions"}


@dataclass
class ProgressArguments:
    output: str = field(default="progress.json", metadata={"help": "JSON report; the .md table and .png plot go next to it"})
    names: list[str] = field(default_factory=list, metadata={"help": "a label per run (default: each folder's name)"})
    metrics: list[str] = field(default_factory=list, metadata={"help": "the metrics to show (default: every one all runs have)"})
    step_cost: list[float] = field(default_factory=list, metadata={
        "help": "per run, the cost of a step relative to the first run's (e.g. 1 1.3): the plot's x axis becomes "
                "relative training time (steps x cost)"})


def read_evaluations(folder: str) -> list[dict]:
    """The evaluations of the run in `folder`, by step; a folder without samples.jsonl says so."""
    path = os.path.join(folder, "samples.jsonl")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such run folder; pass the --output_dir of a train.py run")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: train.py writes it at each evaluation of a run with "
                                "--eval_strategy steps (and --num_sample_captions > 0 or --eval_metrics)")
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{path}, line {number}: not JSON ({err}); train.py writes one JSON object a line") from None
            if not isinstance(row, dict) or "step" not in row:
                raise ValueError(f"{path}, line {number}: not an evaluation of train.py (no 'step')")
            rows.append(row)
    by_step = {row["step"]: {k: v for k, v in row.items() if k not in SKIP} | {"step": row["step"]} for row in rows}
    return [by_step[step] for step in sorted(by_step)]  # a resumed run may log a step twice: the last counts


def progress(folders: list[str], names: list[str], metrics: list[str]) -> dict:
    runs = {name: read_evaluations(folder) for name, folder in zip(names, folders)}
    if not metrics:
        shared = set.intersection(*({k for e in evals for k in e} for evals in runs.values()))
        metrics = sorted(shared - {"step"})
    steps = sorted({e["step"] for evals in runs.values() for e in evals})
    table = []
    for step in steps:
        row = {"step": step}
        for name, evals in runs.items():
            found = next((e for e in evals if e["step"] == step), {})
            row.update({f"{name}.{m}": found.get(m) for m in metrics})
        table.append(row)
    return {"runs": dict(zip(names, folders)), "metrics": metrics, "steps": table}


def markdown(report: dict) -> str:
    names, metrics = list(report["runs"]), report["metrics"]
    header = ["step"] + [f"{name}: {m.removeprefix('eval_')}" for m in metrics for name in names]
    fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    return markdown_table(header, [[row["step"]] + [fmt(row[f"{n}.{m}"]) for m in metrics for n in names]
                                   for row in report["steps"]])


def plot(report: dict, path: str, step_cost: list[float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, metrics = list(report["runs"]), report["metrics"]
    cost = dict(zip(names, step_cost)) if step_cost else {}
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for name in names:
            points = [(row["step"] * cost.get(name, 1.0), row[f"{name}.{metric}"]) for row in report["steps"]
                      if row[f"{name}.{metric}"] is not None]
            if points:
                ax.plot(*zip(*points), "o-", ms=3, label=name)
        ax.set_title(metric.removeprefix("eval_"))
        ax.set_xlabel("training time (first run's steps)" if cost else "step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    parser = HfArgumentParser(ProgressArguments, description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="run folders (each with the samples.jsonl train.py writes)")
    args, rest = parser.parse_args_into_dataclasses(args=argv)
    folders = rest.folders
    names = args.names or [os.path.basename(os.path.normpath(f)) for f in folders]
    if len(names) != len(folders) or (args.step_cost and len(args.step_cost) != len(folders)):
        raise SystemExit("--names and --step_cost take one value per run folder")
    report = progress(folders, names, args.metrics)
    report["command"] = "python -m experiments.progress " + " ".join(sys.argv[1:] if argv is None else argv)
    report["step_cost"] = args.step_cost or None
    base, _ = os.path.splitext(args.output)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    table = markdown(report)
    with open(base + ".md", "w") as f:
        f.write(table + "\n")
    plot(report, base + ".png", args.step_cost)
    print(table)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:  # a folder that is not a run, a damaged samples.jsonl: the message says which
        sys.exit(f"python -m experiments.progress: error: {err}")
