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

function newCard(name) {
  const card = document.createElement("article");
  card.className = "card";
  card.innerHTML = `<h2></h2><p class="stats">segmenting&hellip;</p>
    <div class="pair"><figure><canvas class="orig"></canvas><figcaption>original</figcaption></figure>
    <figure><canvas class="overlay"></canvas><figcaption>polyp overlay</figcaption></figure></div>
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
      const r = await fetch("/v1/segment?prob=true", { method: "POST", body: fd, headers: authHeaders() });
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
    const res = { name: file.webkitRelativePath || file.name, width: W, height: H, prob16, orig,
                  mask: new Uint8Array(W * H), card, response: j };
    for (const cls of ["orig", "overlay"]) { const c = card.querySelector("canvas." + cls); c.width = W; c.height = H; }
    card.querySelector("canvas.orig").getContext("2d").putImageData(orig, 0, 0);
    card.querySelector(".dl-mask").addEventListener("click", () => download(res, "mask"));
    card.querySelector(".dl-overlay").addEventListener("click", () => download(res, "overlay"));
    state.results.push(res);
    render(res);
  } catch (e) {
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

// The mask at the slider's threshold from the 16-bit probability map, and the overlay, drawn here.
function render(res) {
  const { width: W, height: H, prob16, orig, mask } = res;
  const t16 = state.threshold * 65535;
  let area = 0, sum = 0, max = 0;
  for (let i = 0; i < W * H; i++) {
    const p = prob16[i];
    if (p > max) max = p;
    if (p > t16) { mask[i] = 1; area++; sum += p; } else mask[i] = 0;
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
  res.confidence = area ? sum / area / 65535 : null;
  const stats = res.card.querySelector(".stats");
  stats.innerHTML = area
    ? `polyp area <b>${(100 * res.area).toFixed(2)} %</b> of the image &middot; confidence (mean probability inside) ` +
      `<b>${res.confidence.toFixed(3)}</b> &middot; ${W}x${H} &middot; threshold ${state.threshold.toFixed(2)}`
    : `no polyp above threshold ${state.threshold.toFixed(2)} &middot; highest probability ${(max / 65535).toFixed(3)} &middot; ${W}x${H}`;
  res.card.dataset.area = String(res.area);
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
      `(server ${j.latency_ms} ms) · dropped ${j.dropped} stale frame(s) · polyp area ${(100 * j.area_fraction).toFixed(1)} %`;
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
