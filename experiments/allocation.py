"""Where should the parameters go? Split a fixed parameter budget between the vision encoder and the
decoder in several ways, train each split the same way, and tabulate what each model sees.

    python -m experiments.allocation --budget mini --seeds 0 1 --output results/allocation_mini_scenes.json
    python -m experiments.allocation --budget base --output results/allocation_base_scenes.json
    python -m experiments.allocation --budget mini --data photos --output results/allocation_mini_photos.json
    python -m experiments.allocation --budget mini --dry_run     # only print the configurations
    python -m experiments.allocation --budget mini-conv --data photos --dry_run   # mini-112-conv's total, conv tower

The budget is a preset's total (mini-112: ~2.6M on the scenes, base-112: ~11M) with the data's own tokenizer,
which is trained once and shared by every run. Each split keeps the preset's depths (vision layers, decoder
layers) and chooses the vision width and the decoder width (multiples of 8, 8 heads each) whose encoder share
(vision tower / all parameters) is nearest the target and whose total is within 2% of the budget. With the
convolutional tower (`--budget mini-conv`) the vision width is its last stage's channels, the earlier stages
scaled in proportion (`vision_overrides`).

Every run is a recipe of train.py flags (the default recipe's choices: its learning rate, batch, schedule,
auxiliary loss; for photos the photo recipe's) run through `experiments.make_it_see`, so each run has its own
folder, a finished run is skipped and a stopped one resumes from its newest checkpoint: the sweep can be
stopped and started again. The JSON, a markdown table and a PNG (share on x) are rewritten after every run.
"""

import json
import logging
import os
import shutil
import statistics
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from experiments import make_it_see
from benchmarks.sizes import part_sizes
from evaluation.report import markdown_table
from modeling_nanovlm import NanoVLMConfig
from processing import scenes
from processing.data import load_coco_captions
from processing.tokenizer import train_tokenizer
import training

logger = logging.getLogger(__name__)

SHARES = (0.30, 0.50, 0.70, 0.85)
BUDGET_PRESETS = {"mini": "mini-112", "base": "base-112", "mini-conv": "mini-112-conv"}
WIDTHS = range(32, 1025, 8)
TOTAL_TOLERANCE = 0.02
FLICKR8K = "../shared/data/flickr8k"

# Each data kind's recipe: the flags every run shares (train.py's defaults fill in the rest).
SCENES_RECIPE = {"dataset": "scenes", "eval_metrics": "grounding", "eval_steps": 1000, "save_steps": 500,
                 "save_total_limit": 1, "num_validation_examples": 256}
# The photo recipe (configuration/recipes/flickr8k/5_mini_112_v4k_words_aug.json, the best at a fixed budget)
PHOTOS_RECIPE = {"dataset": "coco", "caption_file": f"{FLICKR8K}/captions_train.json", "image_dir": f"{FLICKR8K}/images",
                 "validation_caption_file": f"{FLICKR8K}/captions_val.json", "caption_policy": "all",
                 "num_validation_examples": 1000, "aux_words_weight": 1.0, "augment": True, "learning_rate": 0.001,
                 "per_device_train_batch_size": 32, "warmup_steps": 100, "weight_decay": 0.05, "eval_steps": 500,
                 "save_steps": 500, "save_total_limit": 1, "eval_metrics": "cider", "eval_metrics_examples": 64}
PHOTOS_VOCAB = 4000


@dataclass
class AllocationArguments:
    budget: str = field(default="mini", metadata={"help": "mini (mini-112's total, ~2.6M on the scenes), base (base-112's, ~11M) "
                                                          "or mini-conv (mini-112-conv's, the convolutional tower)"})
    data: str = field(default="scenes", metadata={"help": "scenes (the built-in scenes) or photos (Flickr8k in ../shared)"})
    shares: list[float] = field(default_factory=lambda: list(SHARES), metadata={"help": "encoder shares to train"})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "one run per share and seed"})
    num_train_examples: int = field(default=50000, metadata={"help": "samples each run trains on (the default recipe's 50,000)"})
    num_validation_examples: int = field(default=0, metadata={"help": "validation examples (0: the recipe's, 256 scenes / 1,000 photos)"})
    eval_steps: int = field(default=0, metadata={"help": "evaluate every this many steps (0: the recipe's)"})
    output: str = field(default="allocation.json", metadata={"help": "JSON results; the .md table and .png plot go next to it"})
    output_root: str = field(default="outputs/allocation", metadata={"help": "where each run's folder goes"})
    dry_run: bool = field(default=False, metadata={"help": "print the configurations and stop"})
    step_times: bool = field(default=False, metadata={"help": "instead of training: time a training step of each split and of "
                                                              "the preset itself (writes OUTPUT's *_step_times.json)"})
    step_rounds: int = field(default=3, metadata={"help": "--step_times: rounds over the configurations; each keeps its fastest step"})


def vision_overrides(preset: str, vision_width: int) -> dict:
    """The config fields that give the preset's vision tower the width `vision_width`: `vision_hidden_size` for the
    ViT; for the conv tower `vision_conv_channels`, the preset's stages scaled so the last has `vision_width` channels
    (each a multiple of `vision_conv_groups`, at least one group)."""
    config = NanoVLMConfig.from_preset(preset)
    if config.vision_tower_type != "conv":
        return {"vision_hidden_size": vision_width}
    groups, last = config.vision_conv_groups, config.vision_conv_channels[-1]
    channels = [max(groups, round(c * vision_width / last / groups) * groups) for c in config.vision_conv_channels[:-1]]
    return {"vision_conv_channels": [*channels, vision_width]}


def overrides_text(overrides: dict) -> str:
    """train.py's --config_overrides for config fields (lists '/'-separated)."""
    return ",".join(f"{k}={'/'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in overrides.items())


def vision_label(split: dict) -> str:
    """A split's vision width for tables: the ViT's width, or the conv tower's channels per stage."""
    if "vision_conv_channels" in split:
        return "/".join(map(str, split["vision_conv_channels"]))
    return str(split["vision_hidden_size"])


def allocate(preset: str, vocab_size: int, shares) -> tuple[int, list[dict]]:
    """The preset's total (the budget) and, for each share, the (vision width, decoder width) at the preset's
    depths whose encoder share is nearest it with the total within TOTAL_TOLERANCE of the budget.

    The vision tower's size depends on the vision width alone and the decoder's on the decoder width alone;
    the projector is one Linear(vision width -> decoder width) (the conv tower's width: its last stage's channels).
    So each side is counted once per width and the grid is searched by sums; the chosen configurations are counted
    again whole."""
    def build(vision_width, width):
        return NanoVLMConfig.from_preset(preset, vocab_size=vocab_size, **vision_overrides(preset, vision_width), hidden_size=width)

    budget = part_sizes(NanoVLMConfig.from_preset(preset, vocab_size=vocab_size))["total"]
    vision = {w: part_sizes(build(w, WIDTHS[0]))["vision"] for w in WIDTHS}
    decoder = {w: part_sizes(build(WIDTHS[0], w))["decoder"] for w in WIDTHS}
    candidates = []
    for vision_width in WIDTHS:
        for width in WIDTHS:
            total = vision[vision_width] + decoder[width] + vision_width * width + width
            if abs(total / budget - 1) <= TOTAL_TOLERANCE:
                candidates.append((vision[vision_width] / total, total, vision_width, width))
    if not candidates:
        raise ValueError(f"no widths in {WIDTHS} give {preset}'s total ({budget:,}) within {TOTAL_TOLERANCE:.0%}")
    chosen = []
    for target in shares:
        _, _, vision_width, width = min(candidates, key=lambda c: (round(abs(c[0] - target), 3), abs(c[1] - budget)))
        counts = part_sizes(build(vision_width, width))
        chosen.append({"target_share": target, **vision_overrides(preset, vision_width), "hidden_size": width, **counts,
                       "share": counts["vision"] / counts["total"]})
    return budget, chosen


def split_overrides(split: dict) -> dict:
    """The config fields of a split: its vision width field and its decoder width."""
    return {k: split[k] for k in ("vision_hidden_size", "vision_conv_channels", "hidden_size") if k in split}


def shared_tokenizer(data: str, folder: str, num_train_examples: int) -> int:
    """Train the data's tokenizer once on its training texts (as train.py would), save it in `folder`, return its size."""
    if not os.path.exists(os.path.join(folder, "tokenizer.json")):
        if data == "scenes":
            texts, vocab = scenes.scene_texts(num_train_examples, scenes.TRAIN_SEED), 25000
        else:
            if not os.path.isdir(FLICKR8K):
                raise ValueError(f"--data photos needs Flickr8k at {FLICKR8K} (COCO captions layout); it is not there")
            texts = load_coco_captions(PHOTOS_RECIPE["caption_file"], PHOTOS_RECIPE["image_dir"])["text"]
            vocab = PHOTOS_VOCAB
        staging = f"{folder}.{os.getpid()}"  # sweeps started side by side (one per core) may both train it: one folder wins
        train_tokenizer(texts, vocab_size=vocab).save_pretrained(staging)
        try:
            os.rename(staging, folder)
        except OSError:  # the other sweep's is there: the same texts gave the same tokenizer
            shutil.rmtree(staging)
    with open(os.path.join(folder, "tokenizer.json")) as f:
        return len(json.load(f)["model"]["vocab"])



def write_recipes(args: AllocationArguments, preset: str, splits: list[dict], tokenizer_dir: str) -> list[str]:
    base = SCENES_RECIPE if args.data == "scenes" else PHOTOS_RECIPE
    paths = []
    for seed in args.seeds:  # every share at one seed before the next seed: a stopped sweep still spans the shares
        for split in splits:
            name = f"{args.budget}-{args.data}-share{round(split['target_share'] * 100)}-seed{seed}"
            recipe = {
                "_name": name,
                "_change": f"encoder share {split['share']:.1%} (vision width {vision_label(split)}, "
                           f"decoder width {split['hidden_size']}), seed {seed}",
                **base, "preset": preset, "tokenizer": tokenizer_dir, "seed": seed,
                "config_overrides": overrides_text(split_overrides(split)),
            }
            recipe.update({key: value for key in ("num_validation_examples", "eval_steps") if (value := getattr(args, key))})
            if args.data == "scenes":
                recipe["num_train_examples"] = args.num_train_examples
            else:
                recipe["max_steps"] = args.num_train_examples // recipe["per_device_train_batch_size"]
            path = os.path.join(args.output_root, "recipes", name + ".json")
            with open(path, "w") as f:
                json.dump(recipe, f, indent=1)
            paths.append(path)
    return paths


def columns(data: str) -> list[tuple[str, str, str]]:
    """(header, metric key, format) of what each run measured."""
    if data == "scenes":
        return make_it_see.SCENES_COLUMNS
    return [("val loss", "final.eval_loss", "{:.3f}"), ("image gap", "image_use.image_gap", "{:.3f}"),
            ("BLEU-4", "captions.bleu4", "{:.3f}"), ("CIDEr-D", "captions.cider_d", "{:.3f}")]


def summarize(splits: list[dict], rows: list[dict], data: str) -> list[dict]:
    """One line per share: its configuration, and each metric's mean and spread (max - min) over seeds."""
    summary = []
    for split in splits:
        tag = f"-share{round(split['target_share'] * 100)}-"
        runs = [r for r in rows if tag in r["name"] and r.get("returncode") == 0 and r.get("final.eval_loss") is not None]
        line = {**split, "seeds_finished": len(runs)}
        for _, key, _ in columns(data):
            values = [r[key] for r in runs if r.get(key) is not None]
            line[key] = statistics.mean(values) if values else None
            line[key + ".spread"] = max(values) - min(values) if len(values) > 1 else None
        line["wall_minutes"] = statistics.mean(r["wall_seconds"] / 60 for r in runs) if runs else None
        summary.append(line)
    return summary


def markdown(summary: list[dict], data: str, budget: int, samples: int) -> str:
    cols = columns(data)
    header = ["encoder share", "vision width", "decoder width", "vision / projector / decoder", "total", "seeds",
              "wall time", *(name for name, _, _ in cols)]
    rows = []
    for s in summary:
        cells = [f"{s['share']:.1%}", vision_label(s), str(s["hidden_size"]),
                 f"{s['vision'] / 1e6:.2f}M / {s['projector'] / 1e6:.2f}M / {s['decoder'] / 1e6:.2f}M",
                 f"{s['total'] / 1e6:.2f}M", str(s["seeds_finished"]),
                 "-" if s["wall_minutes"] is None else f"{s['wall_minutes']:.1f} min"]
        for _, key, fmt in cols:
            value, spread = s.get(key), s.get(key + ".spread")
            cells.append("-" if value is None else fmt.format(value) + ("" if spread is None else " ± " + fmt.format(spread / 2)))
        rows.append(cells)
    return (f"Budget {budget / 1e6:.2f}M parameters, {samples:,} training samples a run; "
            "metric: mean over seeds (± half the max-min spread where there are two or more).\n\n" + markdown_table(header, rows))


def plot(summary: list[dict], rows: list[dict], data: str, path: str, title: str) -> None:
    """One panel per metric: each seed's run as a dot, the mean over seeds as a line, share on x."""
    from evaluation.plots import plt

    cols = columns(data)
    fig, axes = plt.subplots(1, len(cols), figsize=(3.6 * len(cols), 3.4), dpi=120, squeeze=False)
    for ax, (name, key, _) in zip(axes[0], cols):
        points = [(s["share"], s[key]) for s in summary if s.get(key) is not None]
        if points:
            ax.plot(*zip(*points), "-", color="tab:blue", linewidth=1.5)
        for s in summary:
            tag = f"-share{round(s['target_share'] * 100)}-"
            runs = [r[key] for r in rows if tag in r["name"] and r.get(key) is not None]
            ax.plot([s["share"]] * len(runs), runs, "o", color="tab:blue", alpha=0.6)
        ax.set_xlabel("encoder share of parameters")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def step_times(args: AllocationArguments, preset: str, vocab_size: int, budget: int, splits: list[dict], tokenizer_dir: str,
               argv) -> dict:
    """What each split costs per second: one training step (forward, backward, AdamW) of the recipe's batch of
    training scenes, one thread, for every split and the preset itself, in turns; each keeps its fastest of
    `step_rounds` rounds of 5 steps. Photos runs see shorter captions than scenes, so this is their cost
    at scene length."""
    import time

    import torch

    from benchmarks.speed import fixed_batch
    from modeling_nanovlm import NanoVLMForConditionalGeneration

    recipe = SCENES_RECIPE if args.data == "scenes" else PHOTOS_RECIPE
    model_args, _, training_args = training.parse_args(["--preset", preset, "--tokenizer", tokenizer_dir])
    batch_size = recipe.get("per_device_train_batch_size", training_args.per_device_train_batch_size)
    processor = training.build_processor(model_args, [], training.image_size_of(model_args), tokenizer_dir)
    batch = fixed_batch(processor, batch_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    configs = {f"{s['share']:.1%}": split_overrides(s) for s in splits}
    configs[preset] = {}
    best = {name: float("inf") for name in configs}
    try:
        for _ in range(args.step_rounds):
            for name, overrides in configs.items():
                torch.manual_seed(0)
                config = NanoVLMConfig.from_preset(preset, vocab_size=vocab_size, **overrides)
                model = NanoVLMForConditionalGeneration(config).train()
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
                for i in range(7):  # 2 warm-up steps, 5 timed
                    start = time.perf_counter()
                    model(**batch).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad()
                    if i >= 2:
                        best[name] = min(best[name], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    reference = best[preset]
    rows = [{"config": name, **overrides, "step_seconds": best[name], "over_preset": best[name] / reference}
            for name, overrides in configs.items()]
    report = {"command": "python -m experiments.allocation " + " ".join(argv or []), "cpus": os.cpu_count(), "threads": 1,
              "budget_preset": preset, "vocab_size": vocab_size, "budget": budget, "batch_size": batch_size,
              "batch": "training scenes (benchmarks.speed.fixed_batch)", "rows": rows}
    path = os.path.splitext(args.output)[0] + "_step_times.json"
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(markdown_table(("encoder share", "vision / decoder width", f"seconds a step of {batch_size}", f"over {preset}"),
                         [(r["config"], f"{vision_label(r) if 'hidden_size' in r else '-'} / {r.get('hidden_size', '-')}",
                           f"{r['step_seconds']:.3f}", f"{r['over_preset']:.2f}x") for r in rows]))
    return report


def main(argv=None):
    (args,) = HfArgumentParser(AllocationArguments).parse_args_into_dataclasses(args=argv)
    if args.budget not in BUDGET_PRESETS:
        raise SystemExit(f"--budget must be one of {sorted(BUDGET_PRESETS)}, got {args.budget!r}")
    if args.data not in ("scenes", "photos"):
        raise SystemExit(f"--data must be scenes or photos, got {args.data!r}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    tokenizer_dir = os.path.join(args.output_root, f"tokenizer-{args.data}")
    os.makedirs(os.path.join(args.output_root, "recipes"), exist_ok=True)
    vocab_size = shared_tokenizer(args.data, tokenizer_dir, args.num_train_examples)
    preset = BUDGET_PRESETS[args.budget]
    budget, splits = allocate(preset, vocab_size, args.shares)
    logger.info("budget %s with a %d-token vocabulary: %s parameters", preset, vocab_size, f"{budget:,}")
    for s in splits:
        logger.info("share %.0f%%: vision width %s, decoder width %d -> %.1f%% of %s", s["target_share"] * 100,
                    vision_label(s), s["hidden_size"], s["share"] * 100, f"{s['total']:,}")
    if args.dry_run:
        return
    if args.step_times:
        step_times(args, preset, vocab_size, budget, splits, tokenizer_dir, argv)
        return
    rows = []
    base, _ = os.path.splitext(args.output)
    for path in write_recipes(args, preset, splits, tokenizer_dir):
        rows.append(make_it_see.run_recipe(path, args.output_root, []))
        summary = summarize(splits, rows, args.data)
        report = {"command": "python -m experiments.allocation " + " ".join(argv or []), "machine": os.uname().nodename,
                  "cpus": os.cpu_count(), "budget_preset": preset, "vocab_size": vocab_size, "budget": budget,
                  "samples_per_run": args.num_train_examples, "summary": summary, "runs": rows}
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
        with open(base + ".md", "w") as f:
            f.write(markdown(summary, args.data, budget, args.num_train_examples) + "\n")
        plot(summary, rows, args.data, base + ".png",
             f"{args.budget} budget ({budget / 1e6:.2f}M) on {args.data}, {args.num_train_examples:,} samples a run")
    print(markdown(summary, args.data, budget, args.num_train_examples))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
