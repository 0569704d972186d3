"""README and docs stay a front door with traceable figures: every results/ file they cite exists,
README.md stays short, and it holds the exact test command CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RESULTS_PATH = re.compile(r"results/[A-Za-z0-9_.\-/]+?\.(?:json|png|md)\b")


def test_every_cited_results_file_exists():
    missing = []
    for doc in DOCS:
        for path in set(RESULTS_PATH.findall(doc.read_text(encoding="utf-8"))):
            if not (ROOT / path).is_file():
                missing.append(f"{doc.relative_to(ROOT)}: {path}")
    assert not missing, "cited but not in the repository:\n" + "\n".join(sorted(missing))


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_holds_the_ci_test_command():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    commands = [line.strip() for line in ci if "python -m pytest" in line and not line.lstrip().startswith("#")]
    assert commands, ".ci/run has no line running python -m pytest"
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    for command in commands:
        assert command in (line.strip() for line in readme), f"README.md lacks CI's test command: {command}"
