"""web/: the page that captions in the browser (onnxruntime-web), checked against Python.

Needs Node.js (>= 20.11) and npm: the first test that needs web/node_modules runs `npm ci --prefix web` (the pinned
onnxruntime-web, puppeteer-core and @sparticuz/chromium, whose package holds the headless Chromium: nothing is
downloaded at run time). Without npm these tests fail and say so; they do not skip.
"""

import base64
import functools
import http.server
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from transformers import ViTImageProcessorPil

from conftest import free_port
from modeling_nanovlm.export_onnx import export_onnx
from test_onnx_export import save_tiny_model

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "web"


@functools.cache
def node_modules() -> Path:
    """web/node_modules, installed with `npm ci` from web/package-lock.json when missing."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.fail(f"tests/test_web.py needs {tool} (Node.js >= 20.11 with npm) on PATH to install and run web/")
    if not (WEB / "node_modules" / ".package-lock.json").exists():
        subprocess.run(["npm", "ci", "--prefix", str(WEB), "--no-audit", "--no-fund"], check=True, timeout=600)
    return WEB / "node_modules"


def run_node(script: str, stdin: str = "", timeout: int = 300) -> str:
    node_modules()
    result = subprocess.run(["node", "--input-type=module", "-e", script], input=stdin, capture_output=True, text=True,
                            cwd=WEB, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_page_preprocessing_is_the_image_processors(tmp_path):
    """web/nanovlm.js resizes (PIL's integer resampling), rescales and normalises as the saved image processor does:
    the same float32 pixel_values for up- and down-scaling, odd sizes and every resample filter it implements."""
    rng = np.random.default_rng(0)
    cases, expected = [], []
    for width, height, size, resample in [(64, 48, 32, 2), (20, 27, 32, 2), (101, 33, 24, 3), (50, 50, 32, 1),
                                          (37, 90, 16, 4), (45, 31, 28, 5), (32, 32, 32, 2)]:
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        processor = ViTImageProcessorPil(size={"height": size, "width": size}, resample=resample,
                                         image_mean=[0.48, 0.45, 0.4], image_std=[0.27, 0.26, 0.28])
        expected.append(processor(Image.fromarray(rgb), return_tensors="np")["pixel_values"][0])
        settings = json.loads(processor.to_json_string())
        cases.append({"rgb": base64.b64encode(rgb.tobytes()).decode(), "width": width, "height": height, "settings": settings})
    out = run_node("""
        import { preprocess } from "./nanovlm.js";
        let input = ""; for await (const chunk of process.stdin) input += chunk;
        const results = JSON.parse(input).map(({ rgb, width, height, settings }) => {
          const pixels = preprocess(new Uint8Array(Buffer.from(rgb, "base64")), width, height, settings);
          return Buffer.from(pixels.data.buffer).toString("base64");
        });
        console.log(JSON.stringify(results));
    """, json.dumps(cases))
    for got, want in zip(json.loads(out), expected):
        np.testing.assert_array_equal(np.frombuffer(base64.b64decode(got), np.float32).reshape(want.shape), want)
