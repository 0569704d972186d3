"""The model card (the Hub repo's README.md) of a trained NanoVLM, written from what its run measured.

Read from the output folder: config.json (preset, sizes), the safetensors headers (parameters),
arguments.json (train.py's data and training arguments), metrics.json (validation loss, grounding,
sample captions, steps, wall time), report.json (an evaluation report, when one was written there)
and samples.png / loss_curve.png (linked; they are pushed next to the card). What a folder does not
hold is left out or said to be unrecorded, never filled in.
"""

import json
import math
import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from safetensors import safe_open

from evaluation.report import markdown_table
from modeling_nanovlm import NanoVLMConfig
from processing import scenes

PAPER = ("[NanoVLMs: How small can we go and still make coherent Vision Language Models?]"
         "(https://arxiv.org/abs/2502.07838)")
LABELS = {
    "final.eval_loss": "validation loss (cross-entropy per caption token)",
    "grounding.object_recall": "object recall: objects in the picture named with the right color and kind",
    "grounding.object_precision": "object precision: named color+kind objects that are in the picture",
    "grounding.chair_i": "CHAIR-i: named objects whose kind is not in the picture (lower is better)",
    "grounding.chair_s": "CHAIR-s: captions that name an object that is not there (lower is better)",
}
PARTS = (("vision encoder", "model.vision_tower."), ("projector", "model.multi_modal_projector."),
         ("decoder", "model.language_model."), ("LM head (untied)", "lm_head."))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _numbers(tree: dict, prefix: str = "") -> list[tuple[str, float]]:
    """Numeric leaves of a (nested) report as (dotted key, value)."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _numbers(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out.append((f"{prefix}{key}", value))
    return out


def _fmt(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.3g}"


_table = markdown_table


def parameter_counts(folder: Path) -> dict[str, int]:
    """Parameters per part, from the safetensors headers (a tied LM head is stored once: as the embedding)."""
    counts = dict.fromkeys([name for name, _ in PARTS] + ["token embedding", "total"], 0)
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                n = math.prod(f.get_slice(key).get_shape())
                counts["total"] += n
                counts["token embedding"] += n if key.endswith("embed_tokens.weight") else 0
                part = next((name for name, prefix in PARTS if key.startswith(prefix)), None)
                if part:
                    counts[part] += n
    return counts


def _is_hub_id(name: str | None) -> bool:
    """ORG/NAME that is not a local path (train.py takes both for --data_path and --model_name_or_path)."""
    return bool(name) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not Path(name).exists()


def _data_description(data: dict) -> tuple[str | None, str, list[str]]:
    """(what it was trained on, the domain its captions hold for, Hub dataset ids) from train.py's data arguments."""
    kind = data.get("dataset")
    if kind == "scenes":
        what = (f"{data['num_train_examples']:,} built-in picture scenes with {data['scenes_style']} descriptions "
                f"(`processing/scenes.py`): Pillow-drawn pictures of 1-4 objects of {len(scenes.KINDS)} kinds "
                f"({', '.join(scenes.KINDS)}) in {len(scenes.COLORS)} colors on {len(scenes.BACKGROUNDS)} backgrounds "
                f"({', '.join(scenes.BACKGROUNDS)}), each described in a 3-4 year old's words; validated on "
                f"{data['num_validation_examples']} other scenes")
        domain = "flat drawn scenes of those objects, and has never seen a photograph"
        return what, domain, []
    if kind == "coco":
        what = (f"the COCO-layout captions `{data['caption_file']}` (images in `{data['image_dir']}`, "
                f"caption policy `{data['caption_policy']}`)")
        return what, f"pictures like those of `{Path(data['caption_file']).name}`", []
    if kind == "hf":
        path = data["data_path"]
        what = f"the dataset `{path}` (columns `{data['image_column']}` / `{data['text_column']}`)"
        return what, f"pictures like those of `{path}`", [path] if _is_hub_id(path) else []
    return None, "the pictures of its training data", []


def _training_settings(training: dict, metrics: dict) -> list[tuple[str, str]]:
    rows = []
    if "train_examples_seen" in metrics:
        rows.append(("examples seen", f"{metrics['train_examples_seen']:,} in {metrics['global_step']:,} optimizer steps"))
    if training:
        world = metrics.get("world_size", 1)
        batch = training["per_device_train_batch_size"] * world * training["gradient_accumulation_steps"]
        rows += [
            ("batch", f"{batch} ({training['per_device_train_batch_size']} per device x {world} process(es) x "
                      f"{training['gradient_accumulation_steps']} accumulation)"),
            ("optimizer", f"{training['optim']}, learning rate {training['learning_rate']:g}, {training['lr_scheduler_type']} "
                          f"schedule, {training['warmup_steps']:g} warmup steps, weight decay {training['weight_decay']:g}"),
            ("precision", "bf16" if training.get("bf16") else "fp16" if training.get("fp16") else "fp32"),
            ("seed", str(training["seed"])),
        ]
    if "wall_seconds" in metrics:
        seconds = metrics["wall_seconds"]
        rows.append(("wall time", (f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s")
                     + " (training, evaluations and the final report)"))
    return rows


def _evaluation(folder: Path, metrics: dict, report: dict) -> str:
    parts = []
    measured = [(k, v) for k, v in _numbers(metrics) if k == "final.eval_loss" or (k.startswith("grounding.") and k != "grounding.num_descriptions")]
    if measured:
        n = metrics.get("grounding.num_descriptions")
        where = f"{n} validation pictures" if n else "the validation split"
        parts.append(f"Measured by train.py on {where} held out from training (`metrics.json`):\n\n"
                     + _table(("measure", "value"), [(LABELS.get(k, f"`{k}`"), _fmt(v)) for k, v in measured]))
    if report:  # evaluation/report.py's: {"settings": {...}, "metrics": {"captions.cider_d": ...}, ...}
        settings = report.get("settings", {})
        on = f" on {settings['num_examples']} examples of {settings['dataset']} data" if {"num_examples", "dataset"} <= set(settings) else ""
        rows = [(LABELS.get(k, f"`{k}`"), _fmt(v)) for k, v in _numbers(report.get("metrics", report))]
        parts.append(f"From the evaluation report{on} (`report.json`):\n\n" + _table(("measure", "value"), rows))
    if metrics.get("samples"):
        rows = [(s["model"], s["truth"]) for s in metrics["samples"][:4]]
        parts.append("Captions of validation pictures:\n\n" + _table(("this model", "the truth"), rows))
    if (folder / "samples.png").is_file():
        parts.append("![validation pictures with this model's caption and the truth](samples.png)")
    return "\n\n".join(parts) or "No measurements in this output folder (no metrics.json or report.json)."


# metrics.json / report.json keys the Hub's model-index holds: (metric type, display name)
INDEXED = {
    "final.eval_loss": ("loss", "validation loss"),
    "grounding.object_recall": ("recall", "object recall"),
    "grounding.chair_i": ("chair_i", "CHAIR-i"),
    "captions.bleu4": ("bleu", "BLEU-4"),
    "captions.cider_d": ("cider", "CIDEr-D"),
}


def eval_results(data: dict, metrics: dict, report: dict) -> list[EvalResult]:
    """The run's own measurements as model-index entries (on its validation split), for the Hub's filters."""
    kind = data.get("dataset")
    dataset = {"scenes": ("nanovlm-scenes", "NanoVLM built-in scenes"),
               "coco": ("coco-captions", Path(data.get("validation_caption_file") or data.get("caption_file") or "captions").name),
               "hf": (data.get("data_path") or "custom", data.get("data_path") or "custom")}.get(kind, ("custom", "training data"))
    values = {**metrics, **{k: v for k, v in _numbers(report.get("metrics", {}))}}
    return [EvalResult(task_type="image-to-text", dataset_type=dataset[0], dataset_name=dataset[1], dataset_split="validation",
                       metric_type=metric, metric_name=name, metric_value=round(float(values[key]), 4))
            for key, (metric, name) in INDEXED.items() if isinstance(values.get(key), (int, float))]


def vision_encoder_line(config) -> str:
    """Which image tower the model has, and its shape: the ViT's stem, blocks and width, or the conv tower's stages."""
    if getattr(config, "vision_tower_type", "vit") == "conv":
        stages = ", ".join(f"{b}x{c}" for b, c in zip(config.vision_conv_blocks, config.vision_conv_channels))
        return (f"vision encoder: convolutional (ResNet-style, GroupNorm), {len(config.vision_conv_channels)} stages of "
                f"residual blocks (blocks x channels: {stages})")
    return (f"vision encoder: ViT, {config.vision_stem} stem + {config.vision_num_hidden_layers} block(s) of width "
            f"{config.vision_hidden_size}")


def image_path(config) -> str:
    """How the image becomes visual tokens, after "NxN images": the ViT's patches or the conv tower's grid."""
    if getattr(config, "vision_tower_type", "vit") == "conv":
        g = config.vision_conv_grid
        return (f" through a convolutional tower, its last feature map average-pooled to a {g}x{g} grid of tokens "
                "after their mean")
    return f" in {config.patch_size}x{config.patch_size} patches (a ViT tower)"


ONNX_SECTION = (
    "`onnx/` holds this model for ONNX Runtime and transformers.js, in the layout of SmolVLM's repos: "
    "`vision_encoder.onnx` (pixel values to the rows that take the `<image>` tokens' places), `embed_tokens.onnx` and "
    "`decoder_model_merged.onnx` (one decoding step with the KV cache; an empty cache for the prompt), and `_quantized` "
    "int8 variants of each. Greedy decoding over them gives `generate()`'s tokens with `do_sample=False, num_beams=1`: "
    "`OnnxCaptioner` in NanoVLM's `modeling_nanovlm/export_onnx.py` does it in Python, and NanoVLM's `web/` page "
    "captions in the browser from this repo's URL."
)


def write_model_card(folder: str | Path, repo_id: str = "ORG/NAME", license: str = "apache-2.0") -> Path:
    """Save the model card as `folder/README.md` (train.py does at the end of training; the push sends it)."""
    path = Path(folder) / "README.md"
    ModelCard(model_card(folder, repo_id, license)).save(path)
    return path


def model_card(folder: str | Path, repo_id: str = "ORG/NAME", license: str = "apache-2.0") -> str:
    """The README.md for `repo_id`: YAML metadata, usage, evaluation, model, training and limitations."""
    folder = Path(folder)
    config = NanoVLMConfig.from_pretrained(folder)
    arguments, metrics = _read_json(folder / "arguments.json"), _read_json(folder / "metrics.json")
    report = _read_json(folder / "report.json")
    data, training, model_args = arguments.get("data", {}), arguments.get("training", {}), arguments.get("model", {})
    trained_on, domain, datasets = _data_description(data)
    counts = parameter_counts(folder)
    preset = config.preset or "custom"
    base = model_args.get("model_name_or_path")
    results = eval_results(data, metrics, report)
    metadata = ModelCardData(
        language="en", license=license, library_name="transformers", pipeline_tag="image-to-text",
        tags=["nanovlm", f"nanovlm-{preset}", "image-captioning", "vision-language", "custom_code"],
        datasets=datasets or None, base_model=base if _is_hub_id(base) else None,
        metrics=sorted({r.metric_type for r in results}) or None,
        model_name=repo_id.split("/")[-1] if results else None, eval_results=results or None,
        preset=preset,
    )
    m = lambda n: f"{n / 1e6:.2f}M ({n:,})"  # noqa: E731
    parameters = [
        (vision_encoder_line(config), m(counts["vision encoder"])),
        ("projector (Linear + GELU)", m(counts["projector"])),
        (f"decoder: {config.num_hidden_layers} layers of width {config.hidden_size}", m(counts["decoder"])),
        (f"of which the token embedding ({config.vocab_size:,} tokens, tied with the LM head)", m(counts["token embedding"])),
        *([("LM head (untied)", m(counts["LM head (untied)"]))] if counts["LM head (untied)"] else []),
        ("total", m(counts["total"])),
    ]
    recall, chair = metrics.get("grounding.object_recall"), metrics.get("grounding.chair_i")
    hallucination = (f" On its validation pictures it named {recall:.0%} of the objects there with the right color and kind, "
                     f"and {chair:.0%} of the objects it named were not in the picture." if recall is not None and chair is not None else "")
    name = repo_id.split("/")[-1]
    sections = [
        f"# {name}",
        f"A NanoVLM (`{preset}` preset, {counts['total'] / 1e6:.2f}M parameters) that describes a picture in the simple "
        f"words of a 3-4 year old child, after the paper {PAPER}. Its code ships with the weights: load it with "
        "`trust_remote_code=True`, nothing else to install beyond `transformers` and `torch`.",
        "## Use it",
        f"""```python
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline

captioner = pipeline("image-to-text", model="{repo_id}", trust_remote_code=True)
captioner("picture.jpg")  # [{{"generated_text": "I see a ..."}}]

model = AutoModelForImageTextToText.from_pretrained("{repo_id}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
inputs = processor(images="picture.jpg")                    # or text=["I see a"] to continue a caption
out = model.generate(**inputs, max_new_tokens=48)
print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:]))

model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)  # the same captioner; model.model: hidden states
```""",
        *(["## ONNX: onnxruntime and the browser", ONNX_SECTION] if (folder / "onnx" / "decoder_model_merged.onnx").is_file() else []),
        "## Evaluation",
        _evaluation(folder, metrics, report),
        "## Model",
        f"{config.image_size}x{config.image_size} images{image_path(config)}; the decoder "
        f"reads {config.num_image_tokens} visual token(s) (`vision_feature_select={config.vision_feature_select!r}`) "
        f"before the text, in a context of {config.max_position_embeddings} positions.\n\n"
        + _table(("part", "parameters"), parameters),
        "## Training",
        ((f"Fine-tuned from `{base}`" if base else "From scratch") + f" on {trained_on}." if trained_on else
         "The training data is not recorded in this output folder (train.py writes it to arguments.json).") + "\n\n"
        + (_table(("setting", "value"), _training_settings(training, metrics)) if metrics or training else "Settings not recorded."),
        *(["![training and validation loss](loss_curve.png)"] if (folder / "loss_curve.png").is_file() else []),
        "## Limitations",
        "\n".join([
            "- It speaks like a 3-4 year old on purpose: short sentences, simple words, English only, no fine detail.",
            f"- It knows only {domain}. Pictures unlike its training data get captions that sound right but name things "
            "that are not there." + hallucination,
            f"- {counts['total'] / 1e6:.1f}M parameters trained from scratch on a small data set: a research toy, not a "
            "captioner for accessibility or for any decision about people.",
        ]),
    ]
    return f"---\n{metadata.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
