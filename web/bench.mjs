// The page's captioning speed, driven by benchmarks/onnx.py (`--browser`): one headless Chromium page per variant
// (fp32, int8) with the model loaded, then one caption per line read from stdin, in the order the benchmark
// interleaves them with its other sides.
//
//   node web/bench.mjs '{"model": "MODEL_DIR", "onnx": "MODEL_DIR/onnx", "images": "IMAGE_DIR", "tokens": 24}'
//   stdin:  {"variant": "fp32", "image": "0.png"}      one a line
//   stdout: {"ready": true, "browser": "..."}, then per line {"tokens": [...], "text", "ms", "msPreprocess", "msPerToken"}
//
// Every caption is `tokens` long (the end of text held off, as generate()'s min_new_tokens does).
import readline from "node:readline";
import { WEB, captionImage, launch, openModel, serve } from "./browser.mjs";

const { model, onnx, images, tokens, variants = ["fp32", "int8"] } = JSON.parse(process.argv[2]);
const server = await serve({ "/web/": WEB, "/models/m/": model, "/models/m/onnx/": onnx || `${model}/onnx`, "/images/": images });
const browser = await launch();
try {
  const pages = {};
  for (const variant of variants) {
    const query = `model=../models/m/&max_new_tokens=${tokens}&min_new_tokens=${tokens}${variant === "int8" ? "&quantized=1" : ""}`;
    pages[variant] = await openModel(browser, `${server.base}/web/?${query}`);
  }
  console.log(JSON.stringify({ ready: true, browser: await browser.version() }));
  for await (const line of readline.createInterface({ input: process.stdin })) {
    if (!line.trim()) continue;
    const { variant, image } = JSON.parse(line);
    if (!pages[variant]) throw new Error(`variant ${variant} was not loaded; pass it in "variants"`);
    await pages[variant].bringToFront();
    console.log(JSON.stringify(await captionImage(pages[variant], `${server.base}/images/${encodeURIComponent(image)}`)));
  }
} finally {
  await browser.close();
  await server.close();
}
