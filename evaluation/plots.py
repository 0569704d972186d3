"""Pictures of results: loss curves and image grids with their captions."""

import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_curve(log_history: list[dict], path: str, title: str = "NanoVLM training") -> None:
    """Training loss per logging step and evaluation loss per evaluation, from `trainer.state.log_history`.
    With training-only losses (`aux_*`), the training line is the caption loss alone (`caption_loss`), the one
    the validation loss measures, and the total is drawn faintly beside it."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    captions = [(h["step"], h["caption_loss"]) for h in log_history if "caption_loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    if captions:
        ax.plot(*zip(*captions), label="train caption loss", linewidth=1.2)
        ax.plot(*zip(*train), label="train loss with the training-only losses", linewidth=0.8, alpha=0.4, color="gray")
    elif train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_caption_grid(images, captions, path: str, references=None, columns: int = 4, wrap: int = 38) -> None:
    """Each image with its generated caption (and the reference text, when given) below it."""
    rows = (len(images) + columns - 1) // columns
    lines = 9 if references is not None else 5
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, (3.0 + 0.16 * lines) * rows), dpi=110, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (image, caption) in enumerate(zip(images, captions)):
        ax = axes.flat[i]
        ax.imshow(image)
        text = "model: " + "\n".join(textwrap.wrap(caption, wrap)[:5])
        if references is not None:
            text += "\ntruth: " + "\n".join(textwrap.wrap(references[i], wrap)[:4])
        # Text below the picture (a title's padding would lift it into the picture's bottom edge).
        ax.text(0.0, -0.03, text, transform=ax.transAxes, fontsize=7, ha="left", va="top")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
