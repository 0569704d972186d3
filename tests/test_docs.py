"""README and docs stay a front door with traceable figures: every results/ file they cite exists and every file in
results/ is cited, the README's headline figures match the JSON they come from, README.md stays short, and it holds
the exact test command CI runs."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The documents that may cite a results file: README, docs (study pages and log included), the experiments index
# and the recipe folders' indexes.
DOCS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").rglob("*.md")),
    ROOT / "experiments" / "README.md",
    *sorted((ROOT / "configuration" / "recipes").rglob("README.md")),
]
RESULTS_PATH = re.compile(r"results/[A-Za-z0-9_.\-/]+?\.(?:json|png|md)\b")

# README's headline figures: (the figure as README writes it, the results file(s), the JSON key path in each, what
# turns the values into the written figure). A figure edited in README, or a results file rewritten, fails here.
PCT = "{:.1%}".format
ONNX_FILES = ("vision_encoder", "embed_tokens", "decoder_model_merged")
HEADLINE = [
    ("names 88.4% of the objects", ["default_run_image_tokens_metrics.json"], "grounding.object_recall", PCT),
    ("invents 1.8% of those it names", ["default_run_image_tokens_metrics.json"], "grounding.chair_i", PCT),
    ("mini names 2.7%", ["see_1_paper_mini_cls.json"], "grounding.object_recall", PCT),
    ("invents\n   80.3%", ["see_1_paper_mini_cls.json"], "grounding.chair_i", PCT),
    ("CIDEr-D 0.275", ["eval_flickr8k_9_pooled16_norepeat2.json"], "metrics/captions.cider_d", "{:.3f}".format),
    ("BLEU-4 0.126", ["eval_flickr8k_9_pooled16_norepeat2.json"], "metrics/captions.bleu4", "{:.3f}".format),
    ("0.259 / 0.119 over three seeds",
     ["eval_flickr8k_9_pooled16_norepeat2.json", "eval_flickr8k_9_seed1.json", "eval_flickr8k_9_seed2.json"],
     ("metrics/captions.cider_d", "metrics/captions.bleu4"), lambda cider, bleu: f"{cider:.3f} / {bleu:.3f}"),
    ("object recall 3.1x sooner", ["bench_cpu.json"], "time_to_quality_speedup", "{:.1f}x".format),
    ("generates 1.14-1.49x as fast", ["bench_cpu.json"], "generate_speedup_vs_peer", None),
    ("trains 1.06x as many samples", ["bench_cpu.json"], "train_speedup_vs_peer", "{:.2f}x".format),
    ("11.2 MB in fp32", ["onnx_speed.json"], tuple(f"onnx_file_bytes/{name}.onnx" for name in ONNX_FILES),
     lambda *sizes: f"{sum(sizes) / 1e6:.1f} MB in fp32"),
    ("3.4 MB\n   in int8", ["onnx_speed.json"], tuple(f"onnx_file_bytes/{name}_quantized.onnx" for name in ONNX_FILES),
     lambda *sizes: f"{sum(sizes) / 1e6:.1f} MB\n   in int8"),
    ("1.36x the peer's CIDEr-D", ["photos_peer_recipe9.json"], "cider_d_ratio", "{:.2f}x".format),
    ("validation loss 0.645 against 0.699", ["allocation_mini_scenes.json"], ("summary/0/final.eval_loss", "summary/3/final.eval_loss"),
     lambda split30, split84: f"{split30:.3f} against {split84:.3f}"),
    ("split (30% encoder)", ["allocation_mini_scenes.json"], "summary/0/target_share", "{:.0%}".format),
    ("0.699 at 84%", ["allocation_mini_scenes.json"], "summary/3/share", "{:.0%}".format),
    ("a step costs 1.36x", ["allocation_mini_scenes_step_times.json"], "rows/0/over_preset", "{:.2f}x".format),
    ("mini 5.04M, base 14.59M, large 25.41M", ["sizes.json"],
     ("presets/mini/total", "presets/base/total", "presets/large/total"),
     lambda m, b, g: f"mini {m / 1e6:.2f}M, base {b / 1e6:.2f}M, large {g / 1e6:.2f}M"),
    ("`mini-112` has 2.63M", ["default_run_image_tokens_metrics.json"], "num_parameters", lambda n: f"{n / 1e6:.2f}M"),
]


def cited_results():
    """Every results/ path each document cites, as {path: [documents]}."""
    cited = {}
    for doc in DOCS:
        for path in set(RESULTS_PATH.findall(doc.read_text(encoding="utf-8"))):
            cited.setdefault(path, []).append(str(doc.relative_to(ROOT)))
    return cited


def lookup(data, path):
    """The value at a '/'-separated key path; a key may itself hold dots (metrics.json's flat keys)."""
    for key in path.split("/"):
        data = data[int(key)] if isinstance(data, list) else data[key]
    return data


def test_every_cited_results_file_exists():
    missing = [f"{', '.join(docs)}: {path}" for path, docs in cited_results().items() if not (ROOT / path).is_file()]
    assert not missing, "cited but not in the repository:\n" + "\n".join(sorted(missing))


def test_every_results_file_is_cited():
    cited = cited_results()
    files = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "results").rglob("*") if p.is_file())
    uncited = [path for path in files if path not in cited]
    assert not uncited, ("in results/ but cited by no README, docs/**/*.md, experiments/README.md or recipe README; "
                         "cite each where its figure is stated, or delete it:\n" + "\n".join(uncited))


def headline_section():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return readme[readme.index("## Headline figures"):readme.index("\n## ", readme.index("## Headline figures") + 1)]


@pytest.mark.parametrize("written, files, keys, fmt", HEADLINE, ids=[row[0].split("\n")[0] for row in HEADLINE])
def test_readme_headline_figure_matches_its_results_file(written, files, keys, fmt):
    section = headline_section()
    assert written in section, f"README's headline figures no longer say {written!r}: update HEADLINE in this test with the README"
    assert f"results/{files[0]}" in section, f"README's headline figures do not cite results/{files[0]}"
    datas = [json.loads((ROOT / "results" / name).read_text(encoding="utf-8")) for name in files]
    keys = (keys,) if isinstance(keys, str) else keys
    values = [sum(lookup(d, key) for d in datas) / len(datas) for key in keys] if fmt is not None else None
    if fmt is None:  # a range over every value under the key
        spread = [v for d in datas for v in _leaves(lookup(d, keys[0]))]
        expected = f"{min(spread):.2f}-{max(spread):.2f}x"
    else:
        expected = fmt(*values)
    assert expected in written, f"README says {written!r}; {', '.join(files)} give {expected}"


def test_every_headline_number_is_checked():
    """A number written into the headline figures without a row in HEADLINE would go unchecked."""
    checked = " ".join(row[0] for row in HEADLINE)
    numbers = re.findall(r"(?<![\w.,])\d+(?:\.\d+%?|%)", headline_section())
    unchecked = sorted({n for n in numbers if n not in checked})
    assert not unchecked, f"README's headline figures state {unchecked} with no row in HEADLINE: add one with its results file"


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    else:
        yield value


def test_readme_headline_figures_stay_short():
    section = headline_section().rstrip("\n").splitlines()
    assert len(section) <= 25, f"README's headline figures take {len(section)} lines; move detail to docs/experiments"
    bullets = re.split(r"\n(?=\d\. )", "\n".join(section))[1:]
    assert len(bullets) <= 5, f"README has {len(bullets)} headline figures; keep at most 5"
    for bullet in bullets:
        assert len(bullet.splitlines()) <= 4, f"headline figure over 4 lines: {bullet.splitlines()[0]}"
        assert "python " in bullet and "results/" in bullet, f"headline figure without its command or results file: {bullet.splitlines()[0]}"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_holds_the_ci_test_command():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    commands = [line.strip() for line in ci if "python -m pytest" in line and not line.lstrip().startswith("#")]
    assert commands, ".ci/run has no line running python -m pytest"
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    for command in commands:
        assert command in (line.strip() for line in readme), f"README.md lacks CI's test command: {command}"
