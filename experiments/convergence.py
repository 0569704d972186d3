"""Convergence of two or more runs side by side: training and validation loss by step, one PNG and a JSON.

    python -m experiments.convergence outputs/scenes-short outputs/scenes-long --labels short long \\
        --output results/scenes_convergence_short_long.json --plot results/scenes_convergence_short_long.png

The paper reports the short and the long style's curves at the same preset and steps: a small gap between
training and validation loss, the long style "slightly less stable". Each run's history is read from its
`trainer_state.json` (the output folder's, else its newest checkpoint's). The JSON gives, per run, the last
validation loss, the training caption loss over the same last stretch (the mean of the logged values after the
previous evaluation), their gap, and the roughness of the training curve (the standard deviation of the logged
loss around its running mean over the second half of training), so "less stable" is a number.
"""

import argparse
import glob
import json
import logging
import os
import statistics

from evaluation.plots import plt

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="train.py output folders")
    parser.add_argument("--output", required=True, help="the JSON written")
    parser.add_argument("--plot", required=True, help="the PNG written")
    parser.add_argument("--labels", nargs="+", help="one name per run (default: the folder names)")
    parser.add_argument("--window", type=int, default=10, help="logged values in the running mean the roughness is measured around")
    return parser.parse_args(argv)


def log_history(run: str) -> list[dict]:
    """The run's `trainer_state.json` log history: its own, or its newest checkpoint's."""
    candidates = [os.path.join(run, "trainer_state.json")]
    candidates += sorted(glob.glob(os.path.join(run, "checkpoint-*", "trainer_state.json")),
                         key=lambda p: int(p.split("checkpoint-")[-1].split(os.sep)[0]), reverse=True)
    for path in candidates:
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)["log_history"]
    raise FileNotFoundError(f"{run} has no trainer_state.json, neither its own nor a checkpoint's: pass a train.py output folder")


def curves(history: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, training caption loss) and (step, validation loss). Runs with training-only losses log the caption
    loss apart (`caption_loss`): that is the one the validation loss measures."""
    key = "caption_loss" if any("caption_loss" in h for h in history) else "loss"
    return [(h["step"], h[key]) for h in history if key in h], [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]


def summary(train: list[tuple[int, float]], evals: list[tuple[int, float]], window: int) -> dict:
    last_step, last_eval = evals[-1]
    before = max((step for step, _ in evals if step < last_step), default=0)  # the final evaluation repeats a step
    stretch = [loss for step, loss in train if before < step <= last_step]
    train_loss = statistics.fmean(stretch)
    losses = [loss for _, loss in train]
    half = losses[len(losses) // 2:]
    residuals = [half[i] - statistics.fmean(half[max(0, i - window):i + 1]) for i in range(len(half))]
    return {"steps": train[-1][0], "last_eval_step": last_step, "eval_loss": last_eval, "train_caption_loss": train_loss,
            "gap": last_eval - train_loss, "roughness": statistics.pstdev(residuals), "evals": evals}


def main(argv=None) -> dict:
    args = parse_args(argv)
    labels = args.labels or [os.path.basename(os.path.normpath(run)) for run in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"--labels names {len(labels)} runs, but {len(args.runs)} were given")
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    report = {}
    for run, label, color in zip(args.runs, labels, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        train, evals = curves(log_history(run))
        if not evals:
            raise SystemExit(f"{run} logged no validation loss: train it with --eval_strategy steps")
        report[label] = {"run": run, **summary(train, evals, args.window)}
        ax.plot(*zip(*train), color=color, linewidth=0.9, alpha=0.6, label=f"{label}: train caption loss")
        ax.plot(*zip(*evals), "o-", color=color, linewidth=1.6, label=f"{label}: validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_ylim(top=min(ax.get_ylim()[1], 3.0))
    ax.set_title("Convergence, side by side")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot)
    plt.close(fig)
    with open(args.output, "w") as f:
        json.dump({"command": "python -m experiments.convergence " + " ".join(argv or []), "runs": report}, f, indent=1)
    for label, row in report.items():
        logger.info("%s: validation %.3f, training %.3f, gap %.3f, roughness %.3f", label, row["eval_loss"],
                    row["train_caption_loss"], row["gap"], row["roughness"])
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import sys

    main(sys.argv[1:])
