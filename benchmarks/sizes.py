"""Parameter counts per preset: `python -m benchmarks.sizes [--vocab_size N] [--presets mini-112 mini-112-conv] [--json OUT]`.

Prints the markdown table of docs/architecture.md (vision / projector / decoder / total, tied lm_head counted
once) next to the paper's totals (the paper's presets by default; ours with --presets, either image tower: the
vision column counts whatever `model.vision_tower` holds). Models are built on the meta device: nothing is allocated.
"""

import json
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from evaluation.report import markdown_table
from modeling_nanovlm import PRESETS, NanoVLMConfig, NanoVLMForConditionalGeneration
from modeling_nanovlm.configuration_nanovlm import SEEING_PRESETS

PAPER_TOTALS_M = {"mini": 5, "base": 16, "large": 25}


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def part_sizes(config: NanoVLMConfig) -> dict[str, int]:
    """Parameters of a NanoVLM built from `config`, by part: vision tower, projector, decoder (with the token
    embedding, also given alone; a tied LM head counted once) and total. Built on the meta device."""
    with torch.device("meta"):
        model = NanoVLMForConditionalGeneration(config)
    inner = model.model
    return {
        "vision": count(inner.vision_tower),
        "projector": count(inner.multi_modal_projector),
        "decoder": count(inner.language_model),
        "embedding": inner.language_model.embed_tokens.weight.numel(),
        "total": count(model),
    }


def preset_sizes(presets=tuple(PRESETS), **overrides) -> dict[str, dict[str, int]]:
    """`part_sizes` of each named preset (the paper's by default), with config overrides."""
    return {name: part_sizes(NanoVLMConfig.from_preset(name, **overrides)) for name in presets}


def markdown(sizes: dict) -> str:
    rows = []
    for name, s in sizes.items():
        paper = PAPER_TOTALS_M.get(name)
        rows.append((name, f"{s['vision'] / 1e6:.2f}M", f"{s['projector'] / 1e6:.2f}M",
                     f"{s['decoder'] / 1e6:.2f}M ({s['embedding'] / 1e6:.2f}M)", f"{s['total'] / 1e6:.2f}M",
                     "-" if paper is None else f"~{paper}M ({(s['total'] / 1e6 - paper) / paper:+.0%})"))
    return markdown_table(("preset", "vision", "projector", "decoder (embedding)", "total", "paper"), rows)


@dataclass
class SizesArguments:
    vocab_size: int = field(default=NanoVLMConfig().vocab_size, metadata={"help": "tokens in the vocabulary (embedding rows)"})
    presets: list[str] = field(default_factory=lambda: list(PRESETS), metadata={
        "help": f"presets to count: the paper's {list(PRESETS)} (default) and/or ours {list(SEEING_PRESETS)}"})
    json: str | None = field(default=None, metadata={"help": "also write the counts to this JSON file"})


def main(argv=None):
    (args,) = HfArgumentParser(SizesArguments, description=__doc__.splitlines()[0]).parse_args_into_dataclasses(args=argv)
    unknown = sorted(set(args.presets) - set(PRESETS) - set(SEEING_PRESETS))
    if unknown:
        raise SystemExit(f"--presets: unknown preset(s) {unknown}; choose from {list(PRESETS) + list(SEEING_PRESETS)}")
    sizes = preset_sizes(args.presets, vocab_size=args.vocab_size)
    print(f"vocab_size={args.vocab_size}\n")
    print(markdown(sizes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"vocab_size": args.vocab_size, "presets": sizes}, f, indent=2)


if __name__ == "__main__":
    main()
