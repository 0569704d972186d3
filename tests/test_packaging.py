"""What `pip install` puts in site-packages: the model library, and no generic top-level names."""

import json
import subprocess
import sys


def test_installed_distribution_claims_no_generic_top_level_module(tmp_path):
    """Outside the repository (no cwd on sys.path), only `modeling_nanovlm` imports; `processing`,
    `evaluation` and `benchmarks` (names other projects use too) are not installed."""
    script = (
        "import importlib.util, json, sys\n"
        "sys.path = [p for p in sys.path if p not in ('', '.')]\n"
        "print(json.dumps({name: importlib.util.find_spec(name) is not None\n"
        "                  for name in ('modeling_nanovlm', 'processing', 'evaluation', 'benchmarks', 'train')}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found == {"modeling_nanovlm": True, "processing": False, "evaluation": False, "benchmarks": False, "train": False}
