"""The single HTML page of `vip2clip serve` (kept in a module so that it ships inside the wheel).

`__MAX_BYTES__` is replaced by the server's upload limit. The page decodes the anomaly map (16 bits in the red
and green channels, see `serve.encode_map`) in a canvas and thresholds it when a slider moves, so the mask and
the decision follow the sliders without a new request.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>vip2clip demo</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1100px; }
  h1 { font-size: 1.4em; margin: 0 0 .3em 0; }
  .note { color: #666; font-size: .9em; }
  .row { display: flex; gap: 1em; flex-wrap: wrap; align-items: flex-start; }
  figure { margin: 0; }
  figure img, figure canvas { width: 210px; image-rendering: pixelated; border: 1px solid #ccc; }
  figcaption { font-size: .85em; color: #555; text-align: center; }
  .examples button { border: 1px solid #bbb; background: #fafafa; padding: 4px; cursor: pointer; }
  .examples img { width: 64px; height: 64px; display: block; image-rendering: pixelated; }
  #error { color: #b00020; font-weight: bold; min-height: 1.2em; }
  #decision.anomalous { color: #b00020; } #decision.normal { color: #1b7f3b; }
  .stats { font-size: 1.05em; line-height: 1.6; min-width: 280px; }
  label { display: block; margin-top: .4em; }
  input[type=range] { width: 150px; vertical-align: middle; }
  #result { display: none; margin-top: 1em; }
</style>
</head>
<body>
<h1>vip2clip anomaly detection demo</h1>
<p class="note">Upload an image (up to <span id="limit"></span>) or pick an example. Scores are probabilities in
[0, 1]; the sliders set the image threshold (decision) and the pixel threshold (mask).</p>
<div class="row">
  <div><input type="file" id="file" accept="image/*"></div>
  <div class="examples" id="examples"></div>
</div>
<p id="status" class="note"></p>
<p id="error" role="alert"></p>
<div id="result">
  <div class="row">
    <div class="stats">
      <div>image score: <b id="score"></b></div>
      <div>decision: <b id="decision"></b></div>
      <div>max pixel score: <span id="max-pixel"></span></div>
      <div>defect area: <span id="area"></span></div>
      <div class="note">image size: <span id="size"></span></div>
      <label>image threshold <input type="range" id="image-threshold" min="0" max="1" step="0.001">
        <span id="image-threshold-value"></span></label>
      <label>pixel threshold <input type="range" id="pixel-threshold" min="0" max="1" step="0.001">
        <span id="pixel-threshold-value"></span></label>
    </div>
    <figure><img id="input" alt="input"><figcaption>input</figcaption></figure>
    <figure><img id="overlay" alt="anomaly heat map overlay"><figcaption>overlay (blue 0, red 1)</figcaption></figure>
    <figure><canvas id="mask"></canvas><figcaption>mask at the pixel threshold</figcaption></figure>
  </div>
</div>
<script>
const MAX_BYTES = __MAX_BYTES__;
const $ = (id) => document.getElementById(id);
let current = null, mapPixels = null;
$("limit").textContent = (MAX_BYTES / 1048576).toFixed(1) + " MB";

function showError(message) {
  $("error").textContent = message;
  $("status").textContent = "";
  if (message) { $("result").style.display = "none"; }
}

async function send(url, body) {
  showError("");
  $("status").textContent = "scoring...";
  try {
    const response = await fetch(url, {method: "POST", body: body,
                                       headers: {"Content-Type": "application/octet-stream"}});
    const payload = await response.json();
    if (!response.ok) { showError(payload.error || ("error " + response.status)); return; }
    show(payload);
  } catch (error) {
    showError("request failed: " + error);
  }
}

function show(payload) {
  current = payload;
  $("input").src = payload.image;
  $("overlay").src = payload.overlay;
  $("score").textContent = payload.score.toFixed(4);
  $("max-pixel").textContent = payload.max_pixel_score.toFixed(4);
  $("size").textContent = payload.width + " x " + payload.height;
  $("image-threshold").value = payload.image_threshold;
  $("pixel-threshold").value = payload.pixel_threshold;
  const map = new Image();
  map.onload = () => {
    const canvas = document.createElement("canvas");
    canvas.width = map.width; canvas.height = map.height;
    const context = canvas.getContext("2d");
    context.drawImage(map, 0, 0);
    mapPixels = context.getImageData(0, 0, map.width, map.height);
    update();
    $("result").style.display = "block";
    $("status").textContent = "done";
  };
  map.src = payload.map;
}

function update() {
  if (!current || !mapPixels) { return; }
  const imageThreshold = parseFloat($("image-threshold").value);
  const pixelThreshold = parseFloat($("pixel-threshold").value);
  $("image-threshold-value").textContent = imageThreshold.toFixed(3);
  $("pixel-threshold-value").textContent = pixelThreshold.toFixed(3);
  const decision = current.score >= imageThreshold ? "anomalous" : "normal";
  $("decision").textContent = decision;
  $("decision").className = decision;
  const canvas = $("mask");
  canvas.width = mapPixels.width; canvas.height = mapPixels.height;
  const context = canvas.getContext("2d");
  const out = context.createImageData(mapPixels.width, mapPixels.height);
  const level = pixelThreshold * 65535;
  let flagged = 0;
  for (let i = 0; i < mapPixels.data.length; i += 4) {
    const on = mapPixels.data[i] * 256 + mapPixels.data[i + 1] >= level ? 255 : 0;
    flagged += on ? 1 : 0;
    out.data[i] = out.data[i + 1] = out.data[i + 2] = on;
    out.data[i + 3] = 255;
  }
  context.putImageData(out, 0, 0);
  $("area").textContent = (100 * flagged / (mapPixels.width * mapPixels.height)).toFixed(2) + " %";
}

$("image-threshold").addEventListener("input", update);
$("pixel-threshold").addEventListener("input", update);
$("file").addEventListener("change", () => {
  const file = $("file").files[0];
  if (!file) { return; }
  if (file.size > MAX_BYTES) {
    showError("the file is " + (file.size / 1048576).toFixed(1) + " MB; the limit is "
              + (MAX_BYTES / 1048576).toFixed(1) + " MB");
    return;
  }
  send("/api/predict", file);
});

fetch("/api/examples").then((r) => r.json()).then((examples) => {
  for (const example of examples) {
    const button = document.createElement("button");
    button.className = "example";
    button.id = example.name;
    button.title = example.label;
    button.innerHTML = '<img alt=""><span></span>';
    button.querySelector("img").src = example.thumbnail;
    button.querySelector("span").textContent = example.label;
    button.addEventListener("click", () => send("/api/example?name=" + encodeURIComponent(example.name), ""));
    $("examples").appendChild(button);
  }
});
</script>
</body>
</html>
"""
