// A picture of the page captioning an image, for the README: serves web/ and an exported model folder, loads the
// model, captions IMAGE and saves the page as a PNG.
//
//   python -m modeling_nanovlm.export_onnx MODEL_DIR           # once: the onnx/ files
//   node web/screenshot.mjs MODEL_DIR IMAGE docs/images/web_page.png [--int8] [--width 900] [--max_new_tokens 40]
//
// The image is captioned twice and the second caption is pictured: the first one also warms up WebAssembly, and would
// show a speed no later caption has (benchmarks/onnx.py times warm captions too). Prints the caption and the file's
// size as JSON.
import { stat } from "node:fs/promises";
import path from "node:path";
import { parseArgs } from "node:util";
import { WEB, captionImage, launch, openModel, serve } from "./browser.mjs";

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { int8: { type: "boolean", default: false }, width: { type: "string", default: "900" },
             max_new_tokens: { type: "string", default: "40" } },
});
if (positionals.length !== 3) {
  console.error("usage: node web/screenshot.mjs MODEL_DIR IMAGE OUT.png [--int8] [--width 900] [--max_new_tokens 40]");
  process.exit(2);
}
const [model, image, out] = positionals.map((p) => path.resolve(p));
const name = path.basename(model);
const server = await serve({ "/web/": WEB, [`/models/${name}/`]: model, "/images/": path.dirname(image) });
const browser = await launch();
try {
  const query = `model=../models/${encodeURIComponent(name)}/&max_new_tokens=${values.max_new_tokens}${values.int8 ? "&quantized=1" : ""}`;
  const page = await openModel(browser, `${server.base}/web/?${query}`, { width: Number(values.width), height: 600 });
  const imageUrl = `${server.base}/images/${encodeURIComponent(path.basename(image))}`;
  await captionImage(page, imageUrl);
  const result = await captionImage(page, imageUrl);
  await page.waitForFunction(() => document.getElementById("preview").complete);
  await page.screenshot({ path: out, fullPage: true });
  console.log(JSON.stringify({ caption: result.text, tokens: result.tokens, ms: result.ms, png: out, bytes: (await stat(out)).size }));
} finally {
  await browser.close();
  await server.close();
}
