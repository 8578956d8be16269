// resunetpp serve: the page. Plain JavaScript, no build step, no network access but this server.
"use strict";

const $ = (id) => document.getElementById(id);
const GREEN = [0, 255, 0];
const IMAGE_RE = /\.(jpe?g|png|bmp|tiff?|webp|gif)$/i;

// Everything the page knows; exposed for the browser test and for curious users.
const state = {
  token: sessionStorage.getItem("resunetpp-token") || "",
  threshold: 0.5,
  opacity: 0.35,
  model: null,
  requests: 0,   // /v1/segment requests sent by the image view
  results: [],   // one per image: {name, width, height, prob16, orig, mask, card, ...}
  pending: 0,
};
window.resunetpp = state;

function authHeaders() {
  return state.token ? { Authorization: "Bearer " + state.token } : {};
}

function b64ToBlob(b64, type) {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Blob([bytes], { type });
}

function pixelsOf(source, width, height) {
  const c = document.createElement("canvas");
  c.width = width; c.height = height;
  const ctx = c.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(source, 0, 0, width, height);
  return ctx.getImageData(0, 0, width, height);
}

// ---- the server: health, model card, token ------------------------------------------------------
async function connect() {
  try {
    const health = await (await fetch("/v1/health")).json();
    $("token-box").hidden = !health.auth_required;
    const r = await fetch("/v1/model", { headers: authHeaders() });
    if (r.status === 401) { $("model-line").textContent = "this server needs an access token"; return; }
    const m = await r.json();
    state.model = m;
    setThreshold(m.threshold);
    $("model-line").textContent = `model ${m.model} (${m.weights || "in memory"}), ${m.backend} ${m.precision}, ` +
      `input ${m.input_size.join("x")}, threshold ${m.threshold}` + (m.parameters ? `, ${m.parameters.toLocaleString()} parameters` : "");
  } catch (e) {
    $("model-line").textContent = "cannot reach the server: " + e;
  }
}

$("token-save").addEventListener("click", () => {
  state.token = $("token").value.trim();
  sessionStorage.setItem("resunetpp-token", state.token);
  connect();
});

// ---- sliders -------------------------------------------------------------------------------------
function setThreshold(t) {
  state.threshold = Number(t);
  $("threshold").value = String(t);
  $("threshold-value").textContent = Number(t).toFixed(2);
}

$("threshold").addEventListener("input", (e) => {
  state.threshold = Number(e.target.value);
  $("threshold-value").textContent = state.threshold.toFixed(2);
  state.results.forEach(render);
  for (const live of [videoLive, cameraLive]) live.sendOptions();
});
$("opacity").addEventListener("input", (e) => {
  state.opacity = Number(e.target.value);
  $("opacity-value").textContent = state.opacity.toFixed(2);
  state.results.forEach(render);
});

// ---- tabs ----------------------------------------------------------------------------------------
document.querySelectorAll(".tabs button").forEach((b) => b.addEventListener("click", () => {
  document.querySelectorAll(".tabs button").forEach((x) => x.setAttribute("aria-selected", String(x === b)));
  document.querySelectorAll(".tab").forEach((s) => { s.hidden = s.id !== "tab-" + b.dataset.tab; });
}));

// ---- images --------------------------------------------------------------------------------------
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", async (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  const files = [];
  const entries = [...(e.dataTransfer.items || [])].map((it) => it.webkitGetAsEntry && it.webkitGetAsEntry()).filter(Boolean);
  if (entries.length) {
    for (const entry of entries) await walk(entry, files);
  } else {
    files.push(...e.dataTransfer.files);
  }
  segmentFiles(files);
});
$("files").addEventListener("change", (e) => segmentFiles([...e.target.files]));
$("folder").addEventListener("change", (e) => segmentFiles([...e.target.files]));

function walk(entry, out) {  // a dropped folder, recursively
  return new Promise((resolve) => {
    if (entry.isFile) {
      entry.file((f) => { out.push(f); resolve(); }, () => resolve());
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      const all = [];
      const next = () => reader.readEntries(async (batch) => {
        if (!batch.length) { for (const x of all) await walk(x, out); resolve(); return; }
        all.push(...batch); next();
      }, () => resolve());
      next();
    } else resolve();
  });
}

async function segmentFiles(files) {
  const images = files.filter((f) => (f.type && f.type.startsWith("image/")) || IMAGE_RE.test(f.name));
  const queue = images.slice();
  const worker = async () => { while (queue.length) await segmentFile(queue.shift()); };
  await Promise.all([worker(), worker()]);  // two at a time: the server queues, it does not batch
}

const CERTAINTY = [[0.90, "high"], [0.75, "medium"], [0, "low"]];  // as resunetpp.findings.CERTAINTY_LEVELS
function certainty(conf) {  // conf rounded to 4 decimals first, as the API reports it
  const c = Math.round(conf * 10000) / 10000;
  return CERTAINTY.find(([low]) => c >= low)[1];
}

// 8-connected components of `raw` (0/1 per pixel) with fewer than minArea * W * H pixels dropped, into `out`:
// resunetpp.inference.transforms.drop_small_components, so the page draws the post-processed mask the API returns.
function dropSmallComponents(raw, W, H, minArea, out) {
  const n = W * H, min = minArea * n;
  out.set(raw);
  if (!(minArea > 0)) return out;
  const seen = new Uint8Array(n), stack = new Int32Array(n), comp = new Int32Array(n);
  for (let s = 0; s < n; s++) {
    if (!raw[s] || seen[s]) continue;
    let top = 0, size = 0;
    stack[top++] = s; seen[s] = 1;
    while (top) {
      const i = stack[--top];
      comp[size++] = i;
      const x = i % W, y = (i - x) / W;
      for (let dy = -1; dy <= 1; dy++) {
        const yy = y + dy;
        if (yy < 0 || yy >= H) continue;
        for (let dx = -1; dx <= 1; dx++) {
          const xx = x + dx;
          if (xx < 0 || xx >= W) continue;
          const j = yy * W + xx;
          if (raw[j] && !seen[j]) { seen[j] = 1; stack[top++] = j; }
        }
      }
    }
    if (size < min) for (let k = 0; k < size; k++) out[comp[k]] = 0;
  }
  return out;
}

function newCard(name) {
  const card = document.createElement("article");
  card.className = "card";
  card.innerHTML = `<h2></h2><p class="finding" role="status">segmenting&hellip;</p><p class="stats"></p>
    <details class="about"><summary>what do these mean?</summary></details>
    <div class="pair"><figure><canvas class="orig"></canvas><figcaption>original</figcaption></figure>
    <figure><canvas class="overlay"></canvas><figcaption class="overlay-caption">polyp overlay</figcaption></figure></div>
    <p><button type="button" class="dl-mask">download mask</button> <button type="button" class="dl-overlay">download overlay</button></p>`;
  card.querySelector("h2").textContent = name;
  $("results").prepend(card);
  return card;
}

async function segmentFile(file) {
  const card = newCard(file.webkitRelativePath || file.name);
  state.pending++;
  try {
    let j;
    for (let attempt = 0; ; attempt++) {
      const fd = new FormData();
      fd.append("file", file, file.name);
      state.requests++;
      const r = await fetch("/v1/segment?prob=true&levels=true", { method: "POST", body: fd, headers: authHeaders() });
      j = await r.json();
      if (r.status === 503 && attempt < 20) {  // busy: wait as told, then retry
        await new Promise((ok) => setTimeout(ok, 1000 * Number(r.headers.get("Retry-After") || 1)));
        continue;
      }
      if (!r.ok) throw new Error(j.message || r.statusText);
      break;
    }
    const W = j.width, H = j.height;
    const probPx = pixelsOf(await createImageBitmap(b64ToBlob(j.prob_png, "image/png")), W, H).data;
    const prob16 = new Uint16Array(W * H);
    for (let i = 0; i < W * H; i++) prob16[i] = probPx[4 * i] * 256 + probPx[4 * i + 1];
    let orig;
    try {
      orig = pixelsOf(await createImageBitmap(file), W, H);
    } catch (e) {  // e.g. TIFF, which browsers do not decode: show the mask on grey
      orig = new ImageData(W, H);
      orig.data.fill(96);
    }
    const serverMask = new Uint8Array(W * H);  // the API's post-processed mask at its threshold
    const maskPx = pixelsOf(await createImageBitmap(b64ToBlob(j.mask_png, "image/png")), W, H).data;
    for (let i = 0; i < W * H; i++) serverMask[i] = maskPx[4 * i] > 127 ? 1 : 0;
    let levels = null;  // levels[i] > k exactly where prob > k / 100 (absent with a CRF: then the server redraws)
    if (j.levels_png) {
      const lv = pixelsOf(await createImageBitmap(b64ToBlob(j.levels_png, "image/png"),
                                                  { colorSpaceConversion: "none", premultiplyAlpha: "none" }), W, H).data;
      levels = new Uint8Array(W * H);
      for (let i = 0; i < W * H; i++) levels[i] = lv[4 * i];
    }
    const res = { name: file.webkitRelativePath || file.name, width: W, height: H, prob16, orig, levels, serverMask,
                  minArea: j.min_area, file, masks: new Map([[j.threshold, serverMask]]),
                  mask: new Uint8Array(W * H), card, response: j };
    for (const cls of ["orig", "overlay"]) { const c = card.querySelector("canvas." + cls); c.width = W; c.height = H; }
    card.querySelector("canvas.orig").getContext("2d").putImageData(orig, 0, 0);
    card.querySelector(".dl-mask").addEventListener("click", () => download(res, "mask"));
    card.querySelector(".dl-overlay").addEventListener("click", () => download(res, "overlay"));
    state.results.push(res);
    render(res);
  } catch (e) {
    card.querySelector(".finding").textContent = "not segmented: see the error below (this is not a \"no polyp\" result)";
    card.querySelector(".stats").innerHTML = "";
    const p = document.createElement("span");
    p.className = "error";
    p.textContent = "error: " + e.message;
    card.querySelector(".stats").append(p);
    card.dataset.error = e.message;
  } finally {
    state.pending--;
  }
}

// The post-processed mask at the slider's threshold, exactly as /v1/segment gives it: the server's own mask at
// its threshold; at any other slider value (0.00, 0.01, ..., 1.00) the exact levels thresholded and the
// components under min_area dropped here; with a CRF (no levels) the server is asked for that threshold.
function maskAt(res, t) {
  if (res.masks.has(t)) return res.masks.get(t);
  const k = Math.round(t * 100);
  if (res.levels && Math.abs(k / 100 - t) < 1e-9) {
    const raw = new Uint8Array(res.width * res.height);
    for (let i = 0; i < raw.length; i++) raw[i] = res.levels[i] > k ? 1 : 0;
    const m = dropSmallComponents(raw, res.width, res.height, res.minArea, new Uint8Array(raw.length));
    res.masks.clear();  // keep memory bounded: the server's mask and the latest one
    res.masks.set(res.response.threshold, res.serverMask).set(t, m);
    return m;
  }
  return null;
}

async function fetchMaskAt(res, t) {  // no levels (a CRF): the server post-processes at this threshold
  if (res.fetching === t) return;
  res.fetching = t;
  try {
    const fd = new FormData();
    fd.append("file", res.file, res.file.name);
    state.requests++;
    const r = await fetch("/v1/segment?threshold=" + encodeURIComponent(String(t)), { method: "POST", body: fd,
                                                                                      headers: authHeaders() });
    const j = await r.json();
    if (!r.ok) throw new Error(j.message || r.statusText);
    const px = pixelsOf(await createImageBitmap(b64ToBlob(j.mask_png, "image/png")), res.width, res.height).data;
    const m = new Uint8Array(res.width * res.height);
    for (let i = 0; i < m.length; i++) m[i] = px[4 * i] > 127 ? 1 : 0;
    res.masks.set(t, m);
  } catch (e) {
    res.card.querySelector(".stats").textContent = "error: " + e.message;
  } finally {
    res.fetching = null;
  }
  if (state.threshold === t) render(res);
}

function pct(f) { return (100 * f).toFixed(1) + " %"; }

function render(res) {
  const { width: W, height: H, prob16, orig } = res;
  const t = state.threshold;
  const m = maskAt(res, t);
  if (m === null) {
    res.card.querySelector(".finding").textContent = `updating for threshold ${t.toFixed(2)}…`;
    fetchMaskAt(res, t);
    return;
  }
  const mask = res.mask;
  mask.set(m);
  let area = 0, sum = 0, max = 0;
  for (let i = 0; i < W * H; i++) {
    const p = prob16[i];
    if (p > max) max = p;
    if (mask[i]) { area++; sum += p; }
  }
  const out = new ImageData(new Uint8ClampedArray(orig.data), W, H);
  const a = state.opacity, d = out.data;
  for (let y = 0; y < H; y++) {
    for (let x = 0; x < W; x++) {
      const i = y * W + x;
      if (!mask[i]) continue;
      const edge = x === 0 || y === 0 || x === W - 1 || y === H - 1 || !mask[i - 1] || !mask[i + 1] || !mask[i - W] || !mask[i + W];
      for (let c = 0; c < 3; c++) {
        d[4 * i + c] = edge && a > 0 ? GREEN[c] : Math.round(d[4 * i + c] * (1 - a) + GREEN[c] * a);
      }
    }
  }
  res.overlay = out;
  res.card.querySelector("canvas.overlay").getContext("2d").putImageData(out, 0, 0);
  res.area = area / (W * H);
  res.polyp = area > 0;
  res.confidence = area ? sum / area / 65535 : null;
  res.certainty = area ? certainty(res.confidence) : null;
  const minArea = res.minArea === undefined ? (state.model && state.model.min_area) : res.minArea;
  const specks = minArea > 0 ? `; specks under ${(100 * minArea).toFixed(1)} % of the image are not outlined` : "";
  const finding = res.card.querySelector(".finding");
  finding.classList.toggle("none", !res.polyp);
  res.card.classList.toggle("no-polyp", !res.polyp);
  res.card.querySelector(".overlay-caption").textContent = res.polyp ? "polyp overlay" : "no polyp found: nothing outlined";
  if (res.polyp) {
    finding.innerHTML = `polyp outlined: <b>${pct(res.area)}</b> of the image; model certainty <b>${res.certainty}</b>`;
    res.finding = `polyp outlined: ${pct(res.area)} of the image; model certainty ${res.certainty}`;
  } else {
    finding.innerHTML = "<b>no polyp found</b>";
    res.finding = "no polyp found";
  }
  const timing = res.response && res.response.timing_ms;  // which model ran, and how long its forward pass took
  const ran = state.model ? ` &middot; ${state.model.weights || state.model.model}` +
    (timing ? ` in ${timing.inference} ms` : "") : "";
  res.card.querySelector(".stats").innerHTML = (res.polyp
    ? `area ${(100 * res.area).toFixed(2)} % &middot; confidence (mean probability inside) ${res.confidence.toFixed(3)} ` +
      `&middot; ${W}x${H} &middot; threshold ${t.toFixed(2)}`
    : `nothing above threshold ${t.toFixed(2)} outlined &middot; highest probability ${(max / 65535).toFixed(3)} ` +
      `&middot; ${W}x${H}`) + ran;
  res.card.querySelector("details.about").innerHTML = `<summary>what do these mean?</summary>
    <p><b>Polyp outlined</b>: the share of the image inside the green outline, where the model's probability is above
    the threshold (${t.toFixed(2)})${specks}. <b>No polyp found</b>: nothing is left to outline.</p>
    <p><b>Model certainty</b> is the mean of the model's probability over the outlined pixels (the confidence above):
    high at 0.90 or more, medium from 0.75, low below 0.75. It says how sure the model is of the pixels it outlined,
    not how likely the finding is a polyp.</p>
    <p>Research software, not a medical device: a second look, never a diagnosis.</p>`;
  res.card.dataset.area = String(res.area);
  res.card.dataset.polyp = String(res.polyp);
}

function maskImageData(res) {
  const m = new ImageData(res.width, res.height);
  for (let i = 0; i < res.mask.length; i++) {
    const v = res.mask[i] ? 255 : 0;
    m.data[4 * i] = m.data[4 * i + 1] = m.data[4 * i + 2] = v;
    m.data[4 * i + 3] = 255;
  }
  return m;
}

function download(res, what) {
  const c = document.createElement("canvas");
  c.width = res.width; c.height = res.height;
  c.getContext("2d").putImageData(what === "mask" ? maskImageData(res) : res.overlay, 0, 0);
  c.toBlob((blob) => {
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = res.name.replace(/^.*\//, "").replace(/\.[^.]*$/, "") + "_" + what + ".png";
    a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  }, "image/png");
}

// ---- video file and camera: frames over the WebSocket, newest answered first ---------------------------
class Live {
  constructor(video, canvas, readout) {
    this.video = video; this.canvas = canvas; this.readout = readout;
    this.ws = null; this.running = false; this.seq = 0; this.answered = 0; this.sent = new Map();
    this.busy = false; this.maskLayer = null; this.times = []; this.latency = null; this.dropped = 0; this.frames = 0;
    this.lastSend = 0;
  }

  open() {
    const proto = location.protocol === "https:" ? "wss" : "ws";
    const q = new URLSearchParams({ output: "mask", threshold: String(state.threshold) });
    if (state.token) q.set("token", state.token);
    this.ws = new WebSocket(`${proto}://${location.host}/v1/stream?${q}`);
    this.ws.onmessage = (e) => this.onAnswer(JSON.parse(e.data));
    this.ws.onclose = (e) => { if (this.running) this.readout.textContent = `stream closed (${e.code} ${e.reason || ""})`; };
    this.seq = 0; this.answered = 0; this.sent.clear(); this.times = []; this.frames = 0; this.dropped = 0;
  }

  sendOptions() {
    if (this.ws && this.ws.readyState === 1) this.ws.send(JSON.stringify({ threshold: state.threshold }));
  }

  start() {
    this.running = true;
    this.open();
    const tick = () => {
      if (!this.running) return;
      this.draw();
      this.maybeSend();
      requestAnimationFrame(tick);
    };
    requestAnimationFrame(tick);
  }

  stop() {
    this.running = false;
    if (this.ws) this.ws.close();
    this.ws = null;
  }

  maybeSend() {  // at most 2 frames in flight and 20 frames/s: the server drops the stale ones anyway
    const v = this.video;
    if (!this.ws || this.ws.readyState !== 1 || this.busy || v.readyState < 2 || v.paused || v.ended) return;
    const now = performance.now();
    if (this.seq - this.answered >= 2 || now - this.lastSend < 50) return;
    const scale = Math.min(1, 480 / v.videoWidth);
    const w = Math.round(v.videoWidth * scale), h = Math.round(v.videoHeight * scale);
    if (!w || !h) return;
    const c = this.grab || (this.grab = document.createElement("canvas"));
    c.width = w; c.height = h;
    c.getContext("2d").drawImage(v, 0, 0, w, h);
    this.busy = true;
    this.lastSend = now;
    c.toBlob((blob) => {
      this.busy = false;
      if (!blob || !this.ws || this.ws.readyState !== 1) return;
      this.seq++;
      this.sent.set(this.seq, performance.now());
      this.ws.send(blob);
    }, "image/jpeg", 0.85);
  }

  async onAnswer(j) {
    if (j.error) { this.readout.textContent = "error: " + j.message; if (j.frame) this.answered = j.frame; return; }
    const t0 = this.sent.get(j.frame);
    for (const k of this.sent.keys()) if (k <= j.frame) this.sent.delete(k);
    this.answered = Math.max(this.answered, j.frame);
    const now = performance.now();
    this.latency = t0 === undefined ? null : now - t0;
    this.times.push(now);
    while (this.times.length && now - this.times[0] > 2000) this.times.shift();
    this.frames++;
    this.dropped = j.dropped;
    const fps = this.times.length > 1 ? (this.times.length - 1) / ((now - this.times[0]) / 1000) : 0;
    this.fps = fps;
    this.readout.textContent = `${fps.toFixed(1)} frames/s segmented · latency ${this.latency === null ? "?" : this.latency.toFixed(0)} ms ` +
      `(server ${j.latency_ms} ms) · dropped ${j.dropped} stale frame(s) · ${j.finding || pct(j.area_fraction)}`;
    const px = pixelsOf(await createImageBitmap(b64ToBlob(j.mask_png, "image/png")), j.width, j.height);
    const layer = new ImageData(j.width, j.height);
    const alpha = Math.round(255 * state.opacity);
    for (let i = 0; i < j.width * j.height; i++) {
      if (px.data[4 * i] > 127) { layer.data[4 * i + 1] = 255; layer.data[4 * i + 3] = alpha; }
    }
    const c = this.maskLayer || (this.maskLayer = document.createElement("canvas"));
    c.width = j.width; c.height = j.height;
    c.getContext("2d").putImageData(layer, 0, 0);
  }

  draw() {
    const v = this.video;
    if (v.readyState < 2 || !v.videoWidth) return;
    if (this.canvas.width !== v.videoWidth) { this.canvas.width = v.videoWidth; this.canvas.height = v.videoHeight; }
    const ctx = this.canvas.getContext("2d");
    ctx.drawImage(v, 0, 0);
    if (this.maskLayer) ctx.drawImage(this.maskLayer, 0, 0, this.canvas.width, this.canvas.height);
  }
}

const videoLive = new Live($("video-el"), $("video-canvas"), $("video-readout"));
const cameraLive = new Live($("camera-el"), $("camera-canvas"), $("camera-readout"));
state.live = { video: videoLive, camera: cameraLive };

$("video-file").addEventListener("change", async (e) => {
  const f = e.target.files[0];
  if (!f) return;
  videoLive.stop();
  const v = videoLive.video;
  v.srcObject = null;
  v.src = URL.createObjectURL(f);
  v.loop = false;
  try { await v.play(); } catch (err) { videoLive.readout.textContent = "cannot play this video here: " + err.message; return; }
  videoLive.start();
});
$("video-stop").addEventListener("click", () => { videoLive.stop(); videoLive.video.pause(); });

$("camera-start").addEventListener("click", async () => {
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 1280 } }, audio: false });
    const v = cameraLive.video;
    v.srcObject = stream;
    await v.play();
    cameraLive.start();
  } catch (err) {
    cameraLive.readout.textContent = "no camera: " + err.message;
  }
});
$("camera-stop").addEventListener("click", () => {
  cameraLive.stop();
  const s = cameraLive.video.srcObject;
  if (s) s.getTracks().forEach((t) => t.stop());
  cameraLive.video.srcObject = null;
  cameraLive.readout.textContent = "camera off";
});

connect();
