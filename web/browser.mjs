// The page in headless Chromium, for the scripts beside this file (bench.mjs, screenshot.mjs): a static server of
// web/ and a model folder, the browser that @sparticuz/chromium ships (nothing downloaded at run time), and the calls
// that load a model and caption an image through the page's own code.
import http from "node:http";
import { readFile, stat } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const WEB = path.dirname(fileURLToPath(import.meta.url));

const TYPES = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".json": "application/json",
                ".wasm": "application/wasm", ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg" };

// Serves each folder of `mounts` ({"/web/": WEB, "/models/x/": "/path/to/x"}) under its URL prefix, the longest prefix
// first. Returns {base, close}.
export async function serve(mounts) {
  const prefixes = Object.keys(mounts).sort((a, b) => b.length - a.length);
  const server = http.createServer(async (request, response) => {
    const pathname = decodeURIComponent(new URL(request.url, "http://localhost").pathname);
    const prefix = prefixes.find((p) => pathname.startsWith(p));
    const root = prefix && path.resolve(mounts[prefix]);
    let file = prefix && path.resolve(root, "." + pathname.slice(prefix.length - 1));
    try {
      if (!prefix || (file !== root && !file.startsWith(root + path.sep))) throw new Error("outside the served folders");
      if ((await stat(file)).isDirectory()) file = path.join(file, "index.html");
      const data = await readFile(file);
      response.writeHead(200, { "Content-Type": TYPES[path.extname(file)] || "application/octet-stream" });
      response.end(data);
    } catch {
      response.writeHead(404, { "Content-Type": "text/plain" });
      response.end(`${pathname}: not found`);
    }
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { base: `http://127.0.0.1:${server.address().port}`, close: () => new Promise((resolve) => server.close(resolve)) };
}

// Headless Chromium with background tabs running at full speed (two pages, fp32 and int8, are timed in turn).
export async function launch() {
  const [{ default: chromium }, { default: puppeteer }] = await Promise.all([import("@sparticuz/chromium"), import("puppeteer-core")]);
  try {
    return await puppeteer.launch({
      executablePath: await chromium.executablePath(), headless: true,
      args: [...chromium.args, "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
             "--disable-backgrounding-occluded-windows"],
    });
  } catch (err) {
    const hint = /shared libraries/.test(err.message)
      ? " (@sparticuz/chromium's browser needs the system's NSS: apt-get install libnss3 libnspr4 libexpat1)" : "";
    throw new Error(`headless Chromium did not start: ${err.message}${hint}; run npm ci --prefix web first`);
  }
}

// A new page at `url` (the page with ?model=...) once its model has loaded; an error names what the page said.
export async function openModel(browser, url, viewport = { width: 900, height: 800 }) {
  const page = await browser.newPage();
  await page.setViewport(viewport);
  const logs = [];
  page.on("console", (m) => logs.push(m.text()));
  page.on("pageerror", (e) => logs.push(String(e)));
  await page.goto(url);
  await page.waitForFunction(() => ["ready", "error"].includes(document.body.dataset.state), { timeout: 300000 });
  const error = await page.evaluate(() => document.body.dataset.state === "error" && document.getElementById("error").textContent);
  if (error) throw new Error(`${url}: ${error} ${logs.join(" | ")}`);
  return page;
}

// Captions the image at `imageUrl` as picking it would; returns the page's result without its pixel values.
export async function captionImage(page, imageUrl) {
  return page.evaluate(async (url) => {
    const response = await fetch(url);
    if (!response.ok) throw new Error(`${url}: ${response.status}`);
    const serial = window.nanovlm.serial;
    await window.nanovlm.caption(await response.blob());
    if (window.nanovlm.serial !== serial + 1) throw new Error(`no caption for ${url}: ${document.getElementById("error").textContent}`);
    const { tokens, text, ms, msPreprocess, msPerToken } = window.nanovlm.result;
    return { tokens, text, ms, msPreprocess, msPerToken };
  }, imageUrl);
}
