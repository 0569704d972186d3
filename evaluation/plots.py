"""Pictures of results: loss curves and image grids with their captions."""

import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import transforms  # noqa: E402


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


RIGHT, WRONG = "#1a8a1a", "#d01c1c"  # marks of graded claims: green tick, red cross


def _pieces(text: str, marks) -> list[tuple[str, str, bool]]:
    """`text` cut into (piece, color, space before) for word-by-word drawing: the characters of each
    (start, end, right) mark in green or red with a tick or cross after it, the rest black."""
    color = ["black"] * len(text)
    after = {}
    for start, end, right in marks:
        color[start:end] = [RIGHT if right else WRONG] * (end - start)
        after[end] = ("\u2713" if right else "\u2717", RIGHT if right else WRONG)
    pieces, space = [], False
    for i, ch in enumerate(text):
        if i in after:
            pieces.append((*after[i], False))
        if ch.isspace():
            space = True
            continue
        if pieces and not space and pieces[-1][1] == color[i] and i not in after:
            pieces[-1] = (pieces[-1][0] + ch, color[i], pieces[-1][2])
        else:
            pieces.append((ch, color[i], space))
        space = False
    if len(text) in after:
        pieces.append((*after[len(text)], False))
    return pieces


def _draw_marked(ax, text: str, marks, width_pt: float, fontsize: float) -> int:
    """Draw `text` below the axes, wrapped between words at `width_pt`, with its marks colored (`_pieces`);
    returns the number of lines."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    words: list[list[tuple[str, str]]] = []  # a word: its pieces, drawn without a gap
    for piece, color, space_before in _pieces(text, marks):
        if space_before or not words:
            words.append([])
        words[-1].append((piece, color))
    x = y = 0.0
    lines = 1
    for word in words:
        gap = 0.3 * fontsize if x > 0 else 0.0
        drawn, width = [], 0.0
        for piece, color in word:
            t = ax.text(0.0, -0.03, piece, fontsize=fontsize, color=color, ha="left", va="top",
                        fontweight="bold" if color != "black" else "normal")
            drawn.append((t, width))
            width += t.get_window_extent(renderer).width * 72 / fig.dpi
        if x > 0 and x + gap + width > width_pt:
            x, y, gap, lines = 0.0, y + fontsize * 1.3, 0.0, lines + 1
        for t, offset in drawn:
            t.set_transform(transforms.offset_copy(ax.transAxes, fig, x + gap + offset, -y, units="points"))
        x += gap + width
    return lines


def plot_caption_grid(images, captions, path: str, references=None, columns: int = 4, wrap: int = 38, marks=None) -> None:
    """Each image with its generated caption (and the reference text, when given) below it.

    `marks`: per caption, (start, end, right) character spans of graded claims (e.g.
    `evaluation.grounding.claim_marks`: places and relations); then the whole caption is shown with
    each claim in green with a tick when right, in red with a cross when wrong."""
    rows = (len(images) + columns - 1) // columns
    if marks is not None:
        _plot_marked_grid(images, captions, path, references, columns, rows, marks)
        return
    lines = 9 if references is not None else 5
    fig, axes = _image_grid(images, columns, rows, 3.0 + 0.16 * lines)
    for i, caption in enumerate(captions):
        ax = axes.flat[i]
        text = "model: " + "\n".join(textwrap.wrap(caption, wrap)[:5])
        if references is not None:
            text += "\ntruth: " + "\n".join(textwrap.wrap(references[i], wrap)[:4])
        # Text below the picture (a title's padding would lift it into the picture's bottom edge).
        ax.text(0.0, -0.03, text, transform=ax.transAxes, fontsize=7, ha="left", va="top")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _image_grid(images, columns: int, rows: int, cell_height: float):
    """(figure, axes): the images in a grid of `columns`, axes off, each cell `cell_height` inches tall."""
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, cell_height * rows), dpi=110, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image in zip(axes.flat, images):
        ax.imshow(image)
    return fig, axes


def _plot_marked_grid(images, captions, path, references, columns, rows, marks) -> None:
    """`plot_caption_grid` with marks: every word of the caption, claims colored, the truth in gray below."""
    fontsize, width_pt = 6.5, 3.2 * 72
    longest = max((len(c) for c in captions), default=0) + max((len(r) for r in references or []), default=0)
    lines = 3 + longest // 60  # about 60 characters a line at this size
    fig, axes = _image_grid(images, columns, rows, 3.0 + 0.13 * lines)
    for i, caption in enumerate(captions):
        ax = axes.flat[i]
        used = _draw_marked(ax, "model: " + caption, [(a + 7, b + 7, r) for a, b, r in marks[i]], width_pt, fontsize)
        if references is not None:
            truth = "truth: " + "\n".join(textwrap.wrap(references[i], 62))
            ax.text(0.0, -0.03, truth, fontsize=fontsize - 0.5, color="dimgray", ha="left", va="top",
                    transform=transforms.offset_copy(ax.transAxes, fig, 0.0, -(used + 0.4) * fontsize * 1.3, units="points"))
    fig.suptitle("place and relation claims: green \u2713 right, red \u2717 wrong", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
