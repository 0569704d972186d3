// The page: loads a model folder (?model=...), takes a picked or dropped image, streams its caption.
// window.nanovlm exposes the last result ({tokens, text, ms, msPreprocess, msPerToken, pixelValues}) and caption(blob),
// what picking a file does, for tests/test_web.py and the scripts beside this file (bench.mjs, screenshot.mjs).
// ?max_new_tokens=N caps a caption (default 40); ?min_new_tokens=N keeps the end of text away for N tokens.
import * as ort from "./node_modules/onnxruntime-web/dist/ort.wasm.min.mjs";
import { Captioner, modelBase, rgbaToRGB } from "./nanovlm.js";

ort.env.wasm.numThreads = 1;  // threads need cross-origin isolation, which a plain static server does not give

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const state = { captioner: null, serial: 0, result: null, busy: false };
window.nanovlm = state;

function showError(message) {
  $("error").textContent = message;
  document.body.dataset.state = "error";
}

async function load(model, quantized) {
  $("error").textContent = "";
  state.captioner = null;
  document.body.dataset.state = "loading";
  const base = modelBase(model, location.href);
  try {
    state.captioner = await Captioner.load(ort, base, { quantized, onProgress: (m) => { $("status").textContent = m; } });
  } catch (err) {
    $("status").textContent = "No model loaded.";
    showError(`The model at ${base} did not load: ${err.message}`);
    return;
  }
  $("status").textContent = `Loaded ${model}${quantized ? " (int8)" : ""}. Pick or drop an image.`;
  document.body.dataset.state = "ready";
}

// An image file's 8-bit RGBA pixels, upright (EXIF), without colour conversion or premultiplied alpha.
async function pixels(file) {
  const bitmap = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none",
                                                  imageOrientation: "from-image" });
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const context = canvas.getContext("2d", { willReadFrequently: true, colorSpace: "srgb" });
  context.drawImage(bitmap, 0, 0);
  return { rgba: context.getImageData(0, 0, bitmap.width, bitmap.height).data, width: bitmap.width, height: bitmap.height };
}

async function caption(file) {
  if (!state.captioner) return showError("Load a model first.");
  if (state.busy) return;
  state.busy = true;
  $("error").textContent = "";
  $("caption").textContent = "";
  $("speed").textContent = "";
  $("preview").src = URL.createObjectURL(file);
  document.body.dataset.state = "captioning";
  try {
    const started = performance.now();
    const { rgba, width, height } = await pixels(file);
    const pixelValues = state.captioner.pixelValues(rgbaToRGB(rgba), width, height);
    const preprocessed = performance.now();  // a caption's time: from pixel_values, as benchmarks/onnx.py times Python
    const maxNewTokens = Number(params.get("max_new_tokens") || 40);
    const minNewTokens = Number(params.get("min_new_tokens") || 0);
    let last = { tokens: [], text: "" }, total = 0;
    for await (const step of state.captioner.caption(pixelValues, { maxNewTokens, minNewTokens })) {
      last = step;
      total += step.ms;
      $("caption").textContent = step.text;
      $("speed").textContent = `${step.tokens.length} tokens, ${(total / step.tokens.length).toFixed(1)} ms/token`;
    }
    const ms = performance.now() - preprocessed;
    $("speed").textContent = `${last.tokens.length} tokens in ${ms.toFixed(0)} ms (image encoder included), ` +
      `${(total / Math.max(last.tokens.length, 1)).toFixed(1)} ms/token`;
    state.result = { tokens: last.tokens, text: last.text, ms, msPreprocess: preprocessed - started,
                     msPerToken: total / Math.max(last.tokens.length, 1), pixelValues: Array.from(pixelValues.data) };
    state.serial += 1;
    document.body.dataset.state = "done";
  } catch (err) {
    showError(`Captioning failed: ${err.message}`);
  } finally {
    state.busy = false;
  }
}

state.caption = caption;
$("file").addEventListener("change", (e) => e.target.files[0] && caption(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) caption(e.dataTransfer.files[0]);
});
$("model-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const url = new URL(location.href);
  url.searchParams.set("model", $("model").value);
  if ($("quantized").checked) url.searchParams.set("quantized", "1"); else url.searchParams.delete("quantized");
  history.replaceState(null, "", url);
  load($("model").value, $("quantized").checked);
});

if (params.get("model")) {
  $("model").value = params.get("model");
  $("quantized").checked = params.get("quantized") === "1";
  load(params.get("model"), params.get("quantized") === "1");
}
