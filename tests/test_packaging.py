"""What `pip install` puts in site-packages: the model library, and no generic top-level names."""

import json
import subprocess
import sys

NAMES = ("modeling_nanovlm", "processing", "descriptions", "llm", "evaluation", "benchmarks", "experiments", "publishing", "training",
         "train")


def test_installed_distribution_claims_no_generic_top_level_module(tmp_path):
    """Outside the repository (no cwd on sys.path), only `modeling_nanovlm` imports; `processing`, `evaluation`,
    `benchmarks` and the repository's other rooms (names other projects use too) are not installed."""
    script = (
        "import importlib.util, json, sys\n"
        "sys.path = [p for p in sys.path if p not in ('', '.')]\n"
        "print(json.dumps({name: importlib.util.find_spec(name) is not None\n"
        f"                  for name in {NAMES}}}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found == {name: name == "modeling_nanovlm" for name in NAMES}


def test_code_passes_ruff_with_the_projects_config():
    """pyproject.toml's [tool.ruff] (line length 150, pycodestyle and pyflakes) holds for every file."""
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(root)], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]
