"""train.py's behaviour across the split into the training/ package: the default's and best.json's first losses."""

import json
import os
from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parents[1]
FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"

FIRST_LOSSES = json.loads((ROOT / "tests" / "fixtures" / "first_losses.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("run", ["default", "best"])
def test_the_default_and_best_json_train_as_before(run, tmp_path):
    """The first three logged losses of `python train.py` and of best.json match those recorded before train.py
    was split into the training/ package (tests/fixtures/first_losses.json): the split changed no behaviour."""
    flags = ["--max_steps", "3", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "3", "--eval_strategy", "no",
             "--num_validation_examples", "8", "--report_to", "none", "--output_dir", str(tmp_path / run)]
    if run == "best":
        if not FLICKR8K.exists():
            pytest.skip(f"{FLICKR8K} is absent (it ships beside the project as ../shared); best.json trains on it")
        flags = ["--recipe", str(ROOT / "configuration/recipes/flickr8k/best.json"), *flags]
    else:
        flags += ["--num_train_examples", "256"]
    cwd = os.getcwd()
    os.chdir(ROOT)  # the recipe names ../shared relative to the repository root
    try:
        train.main(flags)
    finally:
        os.chdir(cwd)
    state = json.loads((tmp_path / run / "checkpoint-3" / "trainer_state.json").read_text())
    logged = [{k: h[k] for k in ("step", "loss", "caption_loss") + tuple(k for k in h if k.startswith("aux_"))}
              for h in state["log_history"] if "loss" in h]
    expected = FIRST_LOSSES[run]
    assert [h["step"] for h in logged] == [h["step"] for h in expected]
    for got, want in zip(logged, expected):
        assert set(got) == set(want)
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-3), (run, got["step"], key)
