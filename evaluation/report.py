"""The evaluation's outputs: report.json (every number, with the settings that made it), report.md
(the same numbers in tables a person reads) and samples.png (pictures with their texts)."""

import json
import os

from evaluation.plots import plot_caption_grid

GRID_NAME = "samples.png"


def format_value(value) -> str:
    """How report.md writes a metric: 4 decimals for fractions, integers as they are."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def markdown_table(header, rows) -> str:
    """A markdown table: `header` names the columns, each row gives one cell per column (a `|` or a line
    break inside a cell is escaped). The one table writer of the project's reports, cards and benchmarks."""
    cell = lambda value: str(value).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(cell, row)) + " |" for row in rows])


def _table(header: tuple[str, str], rows) -> list[str]:
    return [markdown_table(header, rows), ""]


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# NanoVLM evaluation of `{s['model']}`", "",
             f"{s['dataset']} data, {s['num_examples']} examples, {report['seconds']['total']:.1f} s in all ({s['date']}).", "",
             "## Metrics", ""]
    lines += _table(("metric", "value"), ((k, format_value(v)) for k, v in report["metrics"].items()))
    lines += ["## Time (seconds)", ""] + _table(("part", "seconds"), ((k, f"{v:.1f}") for k, v in report["seconds"].items()))
    lines += ["## Settings", ""] + _table(("setting", "value"), ((k, json.dumps(v) if isinstance(v, (dict, list)) else v)
                                                                 for k, v in s.items()))
    lines += ["## Samples", ""]
    lines += _table(("model", "reference"), ((r["model"], r["reference"]) for r in report["samples"]))
    if report.get("judge_samples"):
        header = ("beginning", "model's completion", "scores", "reference's completion", "scores")
        rows = [(r["beginning"], r["model"], json.dumps(r["model_scores"]), r["reference"], json.dumps(r["reference_scores"]))
                for r in report["judge_samples"]]
        lines += ["## Judged completions", "", *_table(header, rows)]
    lines += [f"![pictures with the model's text and the reference]({s.get('grid', GRID_NAME)})", ""]
    return "\n".join(lines)


def write_report(output_dir: str, report: dict, images, captions, references, grid_size: int = 12, marks=None) -> None:
    """report.json, report.md and samples.png (`marks`: the graded claims of each pictured caption, see
    `plot_caption_grid`)."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(output_dir, "report.md"), "w") as f:
        f.write(markdown(report))
    k = min(grid_size, len(images))
    if k:
        grid = report["settings"].get("grid", GRID_NAME)  # evaluation_samples.png beside a training run's samples.png
        plot_caption_grid(images[:k], captions[:k], os.path.join(output_dir, grid), references=references[:k],
                          marks=marks[:k] if marks is not None else None)


def parse_markdown_metrics(text: str) -> dict[str, str]:
    """The metrics table of a report.md, {name: written value} (to check it against report.json)."""
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ") and not line.startswith("| metric ")]
    return {name.strip(): value.strip() for name, value in rows}
