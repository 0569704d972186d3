"""web/: the page that captions in the browser (onnxruntime-web), checked against Python.

Needs Node.js (>= 20.11) and npm: the first test that needs web/node_modules runs `npm ci --prefix web` (the pinned
onnxruntime-web, puppeteer-core and @sparticuz/chromium, whose package holds the headless Chromium: nothing is
downloaded at run time). Without npm these tests fail and say so; they do not skip.
"""

import base64
import fcntl
import functools
import http.server
import json
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from transformers import ViTImageProcessorPil

from conftest import free_port, toy_image
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
    # One install at a time: pytest-xdist's workers may reach here together.
    with open(Path(tempfile.gettempdir()) / "nanovlm-web-npm-ci.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
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



def test_page_takes_a_folder_path_or_a_hub_repo():
    out = run_node("""
        import { modelBase } from "./nanovlm.js";
        const page = "http://127.0.0.1:8000/web/?model=x";
        console.log(JSON.stringify([modelBase("../outputs/mini", page), modelBase("models/tiny/", page),
                                    modelBase("https://huggingface.co/org/nanovlm-mini", page)]));
    """)
    assert json.loads(out) == ["http://127.0.0.1:8000/outputs/mini/", "http://127.0.0.1:8000/web/models/tiny/",
                               "https://huggingface.co/org/nanovlm-mini/resolve/main/"]

BROWSER_SCRIPT = """
import chromium from "@sparticuz/chromium";
import puppeteer from "puppeteer-core";
const { base, images, maxNewTokens } = JSON.parse(process.argv[1]);
const browser = await puppeteer.launch({ executablePath: await chromium.executablePath(), args: chromium.args, headless: true });
const out = { captions: [] };
try {
  const page = await browser.newPage();
  const logs = [];
  page.on("console", (m) => logs.push(m.text()));
  page.on("pageerror", (e) => logs.push(String(e)));
  const open = async (query) => {
    await page.goto(`${base}/web/?${query}`);
    await page.waitForFunction(() => ["ready", "error"].includes(document.body.dataset.state), { timeout: 120000 });
    return page.evaluate(() => ({ state: document.body.dataset.state, error: document.getElementById("error").textContent }));
  };
  out.load = await open(`model=../models/tiny/&max_new_tokens=${maxNewTokens}`);
  if (out.load.state !== "ready") throw new Error(`the page did not load the model: ${out.load.error}; ${logs.join(" | ")}`);
  const input = await page.$("#file");
  for (const [i, path] of images.entries()) {
    await input.uploadFile(path);
    await page.waitForFunction((n) => window.nanovlm.serial === n || document.body.dataset.state === "error", { timeout: 120000 }, i + 1);
    out.captions.push(await page.evaluate(() => ({ ...window.nanovlm.result, error: document.getElementById("error").textContent,
                                                   caption: document.getElementById("caption").textContent,
                                                   speed: document.getElementById("speed").textContent })));
  }
  out.int8 = await open(`model=../models/tiny/&quantized=1&max_new_tokens=${maxNewTokens}`);
  await (await page.$("#file")).uploadFile(images[0]);
  await page.waitForFunction(() => window.nanovlm.serial === 1 || document.body.dataset.state === "error", { timeout: 120000 });
  out.int8.tokens = await page.evaluate(() => window.nanovlm.result && window.nanovlm.result.tokens);
  out.missing = await open("model=../models/no-such-model");
  out.logs = logs;
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
"""


def web_images(folder: Path) -> list[Path]:
    """Five PNGs the page and Python both read exactly (no JPEG decoder differences): sizes up and down from the
    model's 32x32, tall and wide, and one with fully transparent pixels (laid on white)."""
    rng = np.random.default_rng(0)
    images = [toy_image(0, 32), toy_image(3, 64).resize((80, 50)), toy_image(5, 24),
              Image.fromarray(rng.integers(0, 256, (90, 37, 3), dtype=np.uint8))]
    rgba = toy_image(6, 48).convert("RGBA")
    ImageDraw.Draw(rgba).rectangle([0, 0, 20, 47], fill=(0, 0, 0, 0))
    images.append(rgba)
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"image{i}.png")
        image.save(paths[-1])
    return paths


class _Handler(http.server.SimpleHTTPRequestHandler):
    """The repository root, with /models/tiny/ served from the test's model folder."""

    model_dir = None

    def translate_path(self, path):
        if path.startswith("/models/tiny/"):
            return str(Path(self.model_dir) / path[len("/models/tiny/"):].split("?")[0])
        return super().translate_path(path)

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_page_captions_five_images_with_generates_tokens(tokenizer, tmp_path):
    """The page in headless Chromium: the pixel_values, tokens and text of Python's processor and greedy generate(),
    the speed shown, int8 files that load, and an error on the page for a folder that does not exist."""
    model_dir = tmp_path / "model"
    model, processor = save_tiny_model(model_dir, tokenizer, "mini-112")
    export_onnx(str(model_dir))  # the command's files: dynamo exporter, int8 twins
    images = web_images(tmp_path)
    node_modules()

    handler = functools.partial(type("Handler", (_Handler,), {"model_dir": str(model_dir)}), directory=str(ROOT))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        arguments = json.dumps({"base": f"http://127.0.0.1:{server.server_port}", "images": [str(p) for p in images],
                                "maxNewTokens": 16})
        result = subprocess.run(["node", "--input-type=module", "-e", BROWSER_SCRIPT, arguments], capture_output=True,
                                text=True, cwd=WEB, timeout=400)
    finally:
        server.shutdown()
    hint = ""
    if "error while loading shared libraries" in result.stderr:  # @sparticuz/chromium uses the system's NSS on Debian
        hint = "\n@sparticuz/chromium's browser needs the system's NSS: apt-get install libnss3 libnspr4 libexpat1"
    assert result.returncode == 0, result.stderr[-3000:] + hint
    out = json.loads(result.stdout.strip().splitlines()[-1])

    assert len(out["captions"]) == 5
    for path, got in zip(images, out["captions"]):
        assert not got["error"], got["error"]
        inputs = processor(images=[path], text=[""])
        np.testing.assert_array_equal(np.array(got["pixelValues"], np.float32), inputs["pixel_values"].numpy().ravel())
        expected = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=16)[0, inputs["input_ids"].shape[1]:]
        assert got["tokens"] == expected.tolist(), path.name
        assert got["text"] == got["caption"] == processor.decode(expected)
        assert "ms/token" in got["speed"]
    assert any(len(got["tokens"]) < 16 for got in out["captions"])  # some captions end at <eos>
    assert len({tuple(got["tokens"]) for got in out["captions"]}) > 1  # the image changes the caption
    assert out["int8"]["state"] == "ready", out["int8"]["error"]
    assert 0 < len(out["int8"]["tokens"]) <= 16
    assert out["missing"]["state"] == "error"
    assert "no-such-model/config.json" in out["missing"]["error"] and "404" in out["missing"]["error"]


def test_benchmark_times_the_page_beside_python(tokenizer, tmp_path):
    """`python -m benchmarks.onnx --browser true`: the page in headless Chromium (web/bench.mjs) captions the same
    images, fp32 and int8, each caption held to --new_tokens tokens past the model's end of text (min_new_tokens),
    and the JSON gives its ms per caption and tokens/s beside onnxruntime's and PyTorch's."""
    import random

    from benchmarks.onnx import main as benchmark
    from processing import scenes

    model, processor = save_tiny_model(tmp_path, tokenizer, "mini-112", eos_from_greedy=False)
    inputs = processor(images=[scenes.render_scene(scenes.sample_scene(random.Random(0)), 32)], text=[""])  # the first image
    greedy = model.generate(**inputs, do_sample=False, max_new_tokens=6)[0, inputs["input_ids"].shape[1]:].tolist()
    model.generation_config.eos_token_id = greedy[2]  # its caption would end after 3 tokens
    model.generation_config.save_pretrained(tmp_path)
    export_onnx(str(tmp_path), dynamo=False)
    node_modules()
    benchmark(["--model_dir", str(tmp_path), "--output", str(tmp_path / "speed.json"), "--new_tokens", "6", "--images", "2",
               "--repeats", "1", "--browser", "true"])
    report = json.loads((tmp_path / "speed.json").read_text())
    assert set(report["results"]) == {"pytorch_fp32", "onnxruntime_fp32", "onnxruntime_int8", "browser_fp32", "browser_int8"}
    for name, side in report["results"].items():
        assert side["captions_timed"] == 2 and side["ms_per_caption_median"] > 0
        assert side["tokens_per_s"] == pytest.approx(6 / (side["ms_per_caption_median"] / 1000), rel=0.01), name
    assert report["results"]["browser_int8"]["ms_preprocess_median"] > 0
    assert "onnxruntime-web 1.23.2" in report["machine"]["browser"]


def test_screenshot_script_saves_the_page_captioning(tokenizer, tmp_path):
    """web/screenshot.mjs: the page, 900 pixels wide, with the caption generate() gives, saved as a small PNG."""
    model, processor = save_tiny_model(tmp_path / "model", tokenizer, "mini-112")
    export_onnx(str(tmp_path / "model"), dynamo=False)
    toy_image(2, 64).save(tmp_path / "picture.png")
    png = tmp_path / "page.png"
    node_modules()
    result = subprocess.run(["node", "screenshot.mjs", str(tmp_path / "model"), str(tmp_path / "picture.png"), str(png),
                             "--max_new_tokens", "16"], capture_output=True, text=True, cwd=WEB, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    inputs = processor(images=[tmp_path / "picture.png"], text=[""])
    expected = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=16)[0, inputs["input_ids"].shape[1]:]
    assert out["tokens"] == expected.tolist() and out["caption"] == processor.decode(expected)
    with Image.open(png) as picture:
        assert picture.format == "PNG" and picture.width == 900 and picture.height > 400
        assert len(set(picture.convert("L").getdata())) > 16  # text and the picture, not a blank page
    assert out["bytes"] == png.stat().st_size < 300_000
