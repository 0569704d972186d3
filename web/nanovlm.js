// NanoVLM in JavaScript: the saved image processor, the tokenizer's decoder and the greedy caption loop over a
// model folder's onnx/ files (modeling_nanovlm/export_onnx.py writes them). No DOM and no onnxruntime import
// here: the page hands in onnxruntime-web, and node imports this file to check the preprocessing against PIL
// (tests/test_web.py).

// ---------------------------------------------------------------------------------------------------------------
// Image processor: what transformers' ViTImageProcessorPil does (PIL resize of the 8-bit RGB image, then
// float32 rescale and normalize, channels first), with PIL's own integer resampling arithmetic (Resample.c).
// ---------------------------------------------------------------------------------------------------------------

// PIL's filters: support and weight function, by PIL.Image.Resampling number.
const FILTERS = {
  4: [0.5, (x) => (x > -0.5 && x <= 0.5 ? 1.0 : 0.0)], // BOX
  2: [1.0, (x) => { x = Math.abs(x); return x < 1.0 ? 1.0 - x : 0.0; }], // BILINEAR
  5: [1.0, (x) => { // HAMMING
    if (x < 0.0) x = -x;
    if (x === 0.0) return 1.0;
    if (x >= 1.0) return 0.0;
    x *= Math.PI;
    return (Math.sin(x) / x) * (0.54 + 0.46 * Math.cos(x));
  }],
  3: [2.0, (x) => { // BICUBIC, a = -0.5
    const a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
  }],
  1: [3.0, (x) => { // LANCZOS
    const sinc = (v) => { if (v === 0.0) return 1.0; v *= Math.PI; return Math.sin(v) / v; };
    return x > -3.0 && x < 3.0 ? sinc(x) * sinc(x / 3.0) : 0.0;
  }],
};
const PRECISION_BITS = 32 - 8 - 2;

// PIL's precompute_coeffs + normalize_coeffs_8bpc: for each output pixel, the first input pixel, the count,
// and integer weights scaled by 2^22.
function coefficients(inSize, outSize, resample) {
  const [filterSupport, filter] = FILTERS[resample];
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1.0);
  const support = filterSupport * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const weights = new Int32Array(outSize * ksize);
  const k = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1.0 / filterscale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    let ww = 0.0;
    for (let x = 0; x < xmax; x++) {
      k[x] = filter((x + xmin - center + 0.5) * ss);
      ww += k[x];
    }
    for (let x = 0; x < xmax; x++) {
      const w = ww !== 0.0 ? k[x] / ww : k[x];
      weights[xx * ksize + x] = Math.trunc(w < 0 ? -0.5 + w * (1 << PRECISION_BITS) : 0.5 + w * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { bounds, weights, ksize };
}

function clip8(v) {
  if (v >= (1 << PRECISION_BITS) * 256) return 255;
  if (v <= 0) return 0;
  return Math.floor(v / (1 << PRECISION_BITS));
}

// One pass of PIL's separable resampling over an RGB uint8 image (3 bytes a pixel), along x or y.
// Sums can pass 2^31, so they are kept in doubles (exact below 2^53), not in JS's 32-bit integer ops.
function resamplePass(src, width, height, outSize, resample, horizontal) {
  const { bounds, weights, ksize } = coefficients(horizontal ? width : height, outSize, resample);
  const outW = horizontal ? outSize : width;
  const outH = horizontal ? height : outSize;
  const out = new Uint8ClampedArray(outW * outH * 3);
  const half = 1 << (PRECISION_BITS - 1);
  for (let y = 0; y < outH; y++) {
    for (let x = 0; x < outW; x++) {
      const o = horizontal ? x : y;
      const min = bounds[o * 2], count = bounds[o * 2 + 1];
      for (let c = 0; c < 3; c++) {
        let sum = half;
        for (let i = 0; i < count; i++) {
          const index = horizontal ? (y * width + min + i) * 3 + c : ((min + i) * width + x) * 3 + c;
          sum += src[index] * weights[o * ksize + i];
        }
        out[(y * outW + x) * 3 + c] = clip8(sum);
      }
    }
  }
  return out;
}

// PIL's Image.resize of an RGB image (no box, no reducing_gap): two passes, a side that keeps its size is not
// resampled. Pillow 13 runs the vertical pass first when the height shrinks by more than twice the width's
// reduction (Resample.c); earlier Pillows always start with the horizontal one, which differs by one level in some
// pixels of such images.
export function resizeRGB(rgb, width, height, outW, outH, resample = 2) {
  if (!(resample in FILTERS)) {
    throw new Error(`resample=${resample} (PIL's NEAREST) is not implemented here; save the processor with resample 1-5`);
  }
  const horizontalFirst = !(height - outH > 0 && height - outH > (width - outW) * 2);
  let data = rgb, w = width, h = height;
  const horizontal = () => { if (outW !== w) { data = resamplePass(data, w, h, outW, resample, true); w = outW; } };
  const vertical = () => { if (outH !== h) { data = resamplePass(data, w, h, outH, resample, false); h = outH; } };
  if (horizontalFirst) { horizontal(); vertical(); } else { vertical(); horizontal(); }
  return data;
}

// RGBA (as a canvas gives it) to RGB laid on white where transparent: PIL's alpha_composite over an opaque white
// image, as processing_nanovlm.to_rgb does.
export function rgbaToRGB(rgba) {
  const n = rgba.length / 4;
  const rgb = new Uint8ClampedArray(n * 3);
  const shift = 7;
  for (let i = 0; i < n; i++) {
    const a = rgba[i * 4 + 3];
    for (let c = 0; c < 3; c++) {
      const s = rgba[i * 4 + c];
      if (a === 255) { rgb[i * 3 + c] = s; continue; }
      if (a === 0) { rgb[i * 3 + c] = 255; continue; }
      const blend = 255 * (255 - a);
      const outa255 = a * 255 + blend;
      const coef1 = Math.floor((a * 255 * 255 * (1 << shift)) / outa255);
      const coef2 = 255 * (1 << shift) - coef1;
      const tmp = s * coef1 + 255 * coef2 + (0x80 << shift);
      rgb[i * 3 + c] = Math.floor((Math.floor(tmp / 256) + tmp) / 256) >> shift;
    }
  }
  return rgb;
}

// pixel_values (1, 3, H, W) float32 from an RGB uint8 image, with the settings of preprocessor_config.json.
export function preprocess(rgb, width, height, settings) {
  const size = settings.size || {};
  if (!(size.height && size.width)) {
    throw new Error(`preprocessor_config.json's size must give height and width, got ${JSON.stringify(settings.size)}`);
  }
  let [w, h, data] = [width, height, rgb];
  if (settings.do_resize !== false) {
    data = resizeRGB(rgb, width, height, size.width, size.height, settings.resample ?? 2);
    [w, h] = [size.width, size.height];
  }
  const f = Math.fround;
  const scale = settings.do_rescale !== false ? settings.rescale_factor ?? 1 / 255 : null;
  const mean = (settings.image_mean || [0.5, 0.5, 0.5]).map(f);
  const std = (settings.image_std || [0.5, 0.5, 0.5]).map(f);
  const out = new Float32Array(3 * h * w);
  for (let c = 0; c < 3; c++) {
    for (let i = 0; i < h * w; i++) {
      let v = data[i * 3 + c];
      if (scale !== null) v = f(v * scale); // numpy: float64 multiply, then float32
      if (settings.do_normalize !== false) v = f(f(v - mean[c]) / std[c]); // float32 arithmetic
      out[c * h * w + i] = v;
    }
  }
  return { data: out, dims: [1, 3, h, w] };
}

// ---------------------------------------------------------------------------------------------------------------
// Tokenizer: the byte-level BPE decoder of tokenizer.json (what tokenizer.decode(ids, skip_special_tokens=True)
// gives) and the ids of the caption prompt (<bos>, which the post-processor adds to "").
// ---------------------------------------------------------------------------------------------------------------

// GPT-2's byte <-> printable-character table that byte-level BPE writes tokens in.
function byteDecoder() {
  const bytes = [];
  for (let b = 33; b <= 126; b++) bytes.push(b);
  for (let b = 161; b <= 172; b++) bytes.push(b);
  for (let b = 174; b <= 255; b++) bytes.push(b);
  const chars = bytes.slice();
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bytes.includes(b)) { bytes.push(b); chars.push(256 + n); n++; }
  }
  const table = new Map();
  bytes.forEach((b, i) => table.set(String.fromCharCode(chars[i]), b));
  return table;
}

export class Tokenizer {
  constructor(tokenizerJSON) {
    const model = tokenizerJSON.model || {};
    if (model.type !== "BPE" || (tokenizerJSON.decoder || {}).type !== "ByteLevel") {
      throw new Error("tokenizer.json is not a byte-level BPE tokenizer (NanoVLM's); this page decodes only those");
    }
    this.tokens = new Map(Object.entries(model.vocab).map(([token, id]) => [id, token]));
    this.special = new Set();
    this.added = new Map();
    for (const token of tokenizerJSON.added_tokens || []) {
      this.added.set(token.id, token.content);
      if (token.special) this.special.add(token.id);
    }
    const post = tokenizerJSON.post_processor || {};
    this.prefix = [];  // ids the post-processor puts before a single text ("<bos> $A")
    for (const piece of (post.single || [])) {
      if (!piece.SpecialToken) break;
      this.prefix.push(...post.special_tokens[piece.SpecialToken.id].ids);
    }
    this.bytes = byteDecoder();
    this.utf8 = new TextDecoder("utf-8");
  }

  id(content) {
    for (const [id, token] of this.added) if (token === content) return id;
    throw new Error(`tokenizer.json has no ${content} token`);
  }

  decode(ids) {
    const out = [];
    let pending = [];
    const flush = () => { if (pending.length) out.push(this.utf8.decode(new Uint8Array(pending))); pending = []; };
    for (const id of ids) {
      if (this.special.has(id)) continue;
      if (this.added.has(id)) { flush(); out.push(this.added.get(id)); continue; }
      for (const ch of this.tokens.get(id) ?? "") pending.push(this.bytes.get(ch));
    }
    flush();
    return out.join("");
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The caption loop: what modeling_nanovlm.export_onnx.OnnxCaptioner does at batch 1 (greedy).
// ---------------------------------------------------------------------------------------------------------------

function resolve(base, file) {
  return new URL(file, base.endsWith("/") ? base : base + "/").href;
}

async function fetchOk(url, kind = "json") {
  let response;
  try {
    response = await fetch(url);
  } catch (err) {
    throw new Error(`could not fetch ${url}: ${err.message}`);
  }
  if (!response.ok) throw new Error(`could not fetch ${url}: ${response.status} ${response.statusText}`);
  return kind === "json" ? response.json() : new Uint8Array(await response.arrayBuffer());
}

// A model folder's URL: a path (relative to the page) or a Hub repo (https://huggingface.co/org/name).
export function modelBase(model, pageUrl) {
  const hub = model.match(/^https:\/\/huggingface\.co\/([^/]+\/[^/]+?)\/?$/);
  if (hub) return `https://huggingface.co/${hub[1]}/resolve/main/`;
  const url = new URL(model, pageUrl).href;
  return url.endsWith("/") ? url : url + "/";
}

export class Captioner {
  static async load(ort, base, { quantized = false, onProgress = () => {} } = {}) {
    const self = new Captioner();
    self.ort = ort;
    onProgress("reading config.json");
    self.config = await fetchOk(resolve(base, "config.json"));
    self.generation = await fetchOk(resolve(base, "generation_config.json")).catch(() => ({}));
    self.image = await fetchOk(resolve(base, "preprocessor_config.json")).catch(async () => {
      const processor = await fetchOk(resolve(base, "processor_config.json"));
      if (!processor.image_processor) throw new Error(`${base}: neither preprocessor_config.json nor an image_processor in processor_config.json`);
      return processor.image_processor;
    });
    self.tokenizer = new Tokenizer(await fetchOk(resolve(base, "tokenizer.json")));
    self.sessions = {};
    const suffix = quantized ? "_quantized" : "";
    for (const name of ["vision_encoder", "embed_tokens", "decoder_model_merged"]) {
      const url = resolve(base, `onnx/${name}${suffix}.onnx`);
      onProgress(`loading ${url}`);
      const bytes = await fetchOk(url, "bytes");
      try {
        self.sessions[name] = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"] });
      } catch (err) {
        throw new Error(`onnxruntime-web could not load ${url}: ${err.message}`);
      }
    }
    const eos = self.generation.eos_token_id ?? self.config.eos_token_id;
    self.eos = new Set(Array.isArray(eos) ? eos : [eos]);
    self.layers = self.config.num_hidden_layers;
    self.heads = self.config.num_attention_heads;
    self.headDim = self.config.hidden_size / self.heads;
    self.imageToken = self.config.image_token_id;
    return self;
  }

  pixelValues(rgb, width, height) {
    return preprocess(rgb, width, height, this.image);
  }

  async embed(ids) {
    const input = new this.ort.Tensor("int64", BigInt64Array.from(ids.map(BigInt)), [1, ids.length]);
    return (await this.sessions.embed_tokens.run({ input_ids: input })).inputs_embeds;
  }

  // Yields {token, text, ms} for each new token: greedy decoding with the KV cache, as generate() does; the first
  // `minNewTokens` tokens are never the end of text (generate()'s min_new_tokens), so that timings compare equal work.
  async *caption(pixels, { maxNewTokens = 40, minNewTokens = 0 } = {}) {
    const ort = this.ort;
    const pixelTensor = new ort.Tensor("float32", pixels.data, pixels.dims);
    const features = (await this.sessions.vision_encoder.run({ pixel_values: pixelTensor })).image_features;
    const numImage = features.dims[1], hidden = features.dims[2];
    const ids = [...Array(numImage).fill(this.imageToken), ...this.tokenizer.prefix];
    let embeds = await this.embed(ids);
    const data = embeds.data.slice();
    let row = 0;  // the features take the <image> tokens' places in order (masked_scatter)
    ids.forEach((id, i) => {
      if (id === this.imageToken) data.set(features.data.subarray(row * hidden, (row + 1) * hidden), i * hidden), row++;
    });
    embeds = new ort.Tensor("float32", data, embeds.dims);
    const maxTokens = Math.min(maxNewTokens, this.config.max_position_embeddings - ids.length);
    let past = {};
    for (let i = 0; i < this.layers; i++) {
      for (const kind of ["key", "value"]) {
        past[`past_key_values.${i}.${kind}`] = new ort.Tensor("float32", new Float32Array(0), [1, this.heads, 0, this.headDim]);
      }
    }
    let length = 0;  // tokens in the cache
    const generated = [];
    for (let step = 0; step < maxTokens; step++) {
      const start = performance.now();
      const T = embeds.dims[1];
      const mask = new ort.Tensor("int64", new BigInt64Array(length + T).fill(1n), [1, length + T]);
      const positions = new ort.Tensor("int64", BigInt64Array.from({ length: T }, (_, j) => BigInt(length + j)), [1, T]);
      const out = await this.sessions.decoder_model_merged.run({ inputs_embeds: embeds, attention_mask: mask, position_ids: positions, ...past });
      const vocab = out.logits.dims[2];
      const last = out.logits.data.subarray((T - 1) * vocab, T * vocab);
      const allowed = (v) => generated.length >= minNewTokens || !this.eos.has(v);
      let token = -1;
      for (let v = 0; v < vocab; v++) if (allowed(v) && (token < 0 || last[v] > last[token])) token = v;  // first maximum, as argmax
      past = {};
      for (let i = 0; i < this.layers; i++) {
        for (const kind of ["key", "value"]) past[`past_key_values.${i}.${kind}`] = out[`present.${i}.${kind}`];
      }
      length += T;
      generated.push(token);
      if (!this.eos.has(token)) embeds = await this.embed([token]);
      yield { token, tokens: generated.slice(), text: this.tokenizer.decode(generated), ms: performance.now() - start };
      if (this.eos.has(token)) break;
    }
  }
}
