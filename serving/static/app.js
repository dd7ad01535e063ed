// The gateway's page: send chosen or dropped images to /v1/predict in one request and draw a bar
// chart of each image's class probabilities. Plain DOM, no build step.
"use strict";

const input = document.getElementById("file-input");
const dropZone = document.getElementById("drop-zone");
const statusLine = document.getElementById("status");
const results = document.getElementById("results");
const modelInfo = document.getElementById("model-info");
const modelWarning = document.getElementById("model-warning");

const keyForm = document.getElementById("key-form");
const keyInput = document.getElementById("api-key");

// API keys (GATEWAY_API_KEYS_FILE): a 401 shows the key form; the key is kept for this tab only.
function authHeaders() {
  const key = sessionStorage.getItem("apiKey");
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function api(path, options = {}) {
  return fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
}

function askForKey(body) {
  keyForm.hidden = false;
  setStatus(`${body.error.code}: ${body.error.message}`, true);
  keyInput.focus();
}

let lastFiles = null; // classified again once a key is given

keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("apiKey", keyInput.value.trim());
  keyInput.value = "";
  keyForm.hidden = true;
  setStatus("");
  showModel();
  if (lastFiles) classify(lastFiles);
});

function setStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

async function showModel() {
  try {
    const response = await api("/v1/models");
    const body = await response.json();
    if (response.status === 401) {
      modelInfo.textContent = "The model is behind an API key.";
      askForKey(body);
      return;
    }
    modelInfo.textContent = response.ok
      ? `Model ${body.name}, version ${body.version}: ${body.class_names.length} classes`
      : `Model not available: ${body.error.message}`;
    // A demo model trained on generated shapes must not pass for a CIFAR-10 classifier.
    const card = response.ok ? body.model_card : null;
    modelWarning.hidden = !(card && card.synthetic);
    if (card && card.synthetic) {
      modelWarning.textContent =
        "This model was trained on synthetic shapes, not CIFAR-10 photos: its answers on real " +
        "photos mean nothing. Train on CIFAR-10 (python -m trainer train) and export it to serve a real one.";
    }
  } catch (err) {
    modelInfo.textContent = `Gateway unreachable: ${err}`;
  }
}

function renderPrediction(file, prediction) {
  const card = document.createElement("article");
  card.className = "result";
  const img = document.createElement("img");
  img.src = URL.createObjectURL(file);
  img.alt = file.name;
  const bars = document.createElement("div");
  bars.className = "bars";
  const title = document.createElement("h2");
  const best = prediction.top_k[0];
  const percent = `${(best.probability * 100).toFixed(1)}%`;
  // abstain: the model says the image is unlike its classes (issue 17). The best guess stays visible,
  // but as a guess, under a badge that says so in words (not by colour alone).
  if (prediction.abstain === true) {
    card.classList.add("abstained");
    title.textContent = `${prediction.filename}: not sure (best guess ${best.label}, ${percent})`;
    bars.append(title, notSureBadge(prediction));
  } else {
    title.textContent = `${prediction.filename}: ${best.label} (${percent})`;
    bars.appendChild(title);
  }
  // Every class, most likely first, so the chart reads top-down.
  const entries = Object.entries(prediction.probabilities).sort((a, b) => b[1] - a[1]);
  entries.forEach(([label, p], i) => {
    const row = document.createElement("div");
    row.className = "bar-row" + (i === 0 ? " top" : "");
    row.dataset.label = label;
    const name = document.createElement("span");
    name.className = "bar-label";
    name.textContent = label;
    const track = document.createElement("div");
    track.className = "bar-track";
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = `${(p * 100).toFixed(1)}%`;
    track.appendChild(bar);
    const value = document.createElement("span");
    value.className = "bar-value";
    value.textContent = `${(p * 100).toFixed(1)}%`;
    row.append(name, track, value);
    bars.appendChild(row);
  });
  card.append(img, bars);
  return card;
}

function notSureBadge(prediction) {
  const note = document.createElement("p");
  note.className = "not-sure";
  note.setAttribute("role", "note");
  const badge = document.createElement("strong");
  badge.className = "badge";
  badge.textContent = "Not sure";
  const score =
    typeof prediction.ood_score === "number"
      ? ` (out-of-distribution score ${prediction.ood_score.toFixed(2)})`
      : "";
  note.append(
    badge,
    ` This image does not look like any class the model knows${score}; the label is only its best guess.`,
  );
  return note;
}

// The Grad-CAM overlay for one image: a background-image div (not a second <img>, so the card's
// <img> stays the uploaded picture).
function renderExplanation(explanation) {
  const figure = document.createElement("figure");
  figure.className = "explanation";
  const overlay = document.createElement("div");
  overlay.className = "overlay";
  overlay.setAttribute("role", "img");
  overlay.setAttribute("aria-label", `Grad-CAM heatmap for ${explanation.explained_class}`);
  overlay.style.backgroundImage = `url("data:image/png;base64,${explanation.overlay_png}")`;
  const caption = document.createElement("figcaption");
  caption.textContent = `Grad-CAM: where it sees ${explanation.explained_class}`;
  figure.append(overlay, caption);
  return figure;
}

// Explanations come from a second request to /v1/explain, so the bars never wait for the gradient
// pass; a model that cannot explain (501) or any failure just leaves the bars alone.
async function explain(images, cards) {
  const form = new FormData();
  images.forEach((f) => form.append("images", f, f.name));
  try {
    const response = await api("/v1/explain?top_k=1", { method: "POST", body: form });
    if (!response.ok) return;
    const body = await response.json();
    body.explanations.forEach((e, i) => cards[i].insertBefore(renderExplanation(e), cards[i].lastChild));
  } catch (err) {
    console.warn("no explanation:", err);
  }
}

const EXPLAIN_MAX = 8; // the gateway's default explain image cap (serving/config.py)

async function classify(files) {
  const images = Array.from(files).filter((f) => f.size > 0);
  if (images.length === 0) return;
  const form = new FormData();
  images.forEach((f) => form.append("images", f, f.name));
  lastFiles = images;
  setStatus(`Classifying ${images.length} image(s)…`);
  try {
    const response = await api("/v1/predict?top_k=3", { method: "POST", body: form });
    const body = await response.json();
    if (response.status === 401) {
      askForKey(body);
      return;
    }
    if (!response.ok) {
      setStatus(`${body.error.code}: ${body.error.message}`, true);
      return;
    }
    const cards = body.predictions.map((p, i) => renderPrediction(images[i], p));
    results.replaceChildren(...cards);
    setStatus(`Model ${body.model.name} version ${body.model.version} answered.`);
    // Overlays for the first EXPLAIN_MAX only: /v1/explain refuses more (GATEWAY_MAX_EXPLAIN_IMAGES).
    explain(images.slice(0, EXPLAIN_MAX), cards);
  } catch (err) {
    setStatus(`Request failed: ${err}`, true);
  }
}

input.addEventListener("change", () => classify(input.files));
["dragenter", "dragover"].forEach((type) =>
  dropZone.addEventListener(type, (event) => {
    event.preventDefault();
    dropZone.classList.add("dragging");
  }),
);
["dragleave", "drop"].forEach((type) =>
  dropZone.addEventListener(type, () => dropZone.classList.remove("dragging")),
);
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  classify(event.dataTransfer.files);
});
showModel();
