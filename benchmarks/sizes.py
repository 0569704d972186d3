"""Parameter counts per preset: `python -m benchmarks.sizes [--vocab_size N] [--json OUT]`.

Prints the markdown table of docs/architecture.md (vision / projector / decoder / total, tied lm_head counted
once) next to the paper's totals. Models are built on the meta device: nothing is allocated.
"""

import json
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from evaluation.report import markdown_table
from modeling_nanovlm import PRESETS, NanoVLMConfig, NanoVLMForConditionalGeneration

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


def preset_sizes(**overrides) -> dict[str, dict[str, int]]:
    return {name: part_sizes(NanoVLMConfig.from_preset(name, **overrides)) for name in PRESETS}


def markdown(sizes: dict) -> str:
    rows = []
    for name, s in sizes.items():
        paper = PAPER_TOTALS_M[name]
        rows.append((name, f"{s['vision'] / 1e6:.2f}M", f"{s['projector'] / 1e6:.2f}M",
                     f"{s['decoder'] / 1e6:.2f}M ({s['embedding'] / 1e6:.2f}M)", f"{s['total'] / 1e6:.2f}M",
                     f"~{paper}M ({(s['total'] / 1e6 - paper) / paper:+.0%})"))
    return markdown_table(("preset", "vision", "projector", "decoder (embedding)", "total", "paper"), rows)


@dataclass
class SizesArguments:
    vocab_size: int = field(default=NanoVLMConfig().vocab_size, metadata={"help": "tokens in the vocabulary (embedding rows)"})
    json: str | None = field(default=None, metadata={"help": "also write the counts to this JSON file"})


def main(argv=None):
    (args,) = HfArgumentParser(SizesArguments, description=__doc__.splitlines()[0]).parse_args_into_dataclasses(args=argv)
    sizes = preset_sizes(vocab_size=args.vocab_size)
    print(f"vocab_size={args.vocab_size}\n")
    print(markdown(sizes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"vocab_size": args.vocab_size, "presets": sizes}, f, indent=2)


if __name__ == "__main__":
    main()
