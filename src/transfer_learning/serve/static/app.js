// The tl-serve page: sends the picked images to POST /predict and draws the answers.
// Plain JavaScript, nothing fetched from elsewhere: it works offline.
"use strict";

const TOP_K = 5;
const state = { info: null, items: [] }; // items: {file, url, record, node}
const $ = (id) => document.getElementById(id);

function percent(p) { return (100 * p).toFixed(1) + " %"; }

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function loadInfo() {
  try {
    const response = await fetch("/info");
    state.info = await response.json();
    const card = state.info.model_card || {};
    $("title").textContent = card.title || state.info.checkpoint;
    const task = state.info.task === "multilabel" ? "multi-label (every class that applies)" : "one class per image";
    $("model").textContent = `${state.info.classes.length} classes, ${task}; input ${state.info.input_size} px; ` +
      `temperature ${state.info.temperature.toFixed(3)}` +
      (state.info.uncertain_threshold != null ? `; uncertain below ${percent(state.info.uncertain_threshold)}` : "");
  } catch (err) {
    showError("cannot read /info: " + err);
  }
}

function bar(name, prob, chosen, threshold) {
  const li = document.createElement("li");
  if (chosen) li.classList.add("chosen");
  li.dataset.class = name;
  const label = document.createElement("span");
  label.className = "name";
  label.textContent = name;
  label.title = name;
  const track = document.createElement("span");
  track.className = "track";
  const fill = document.createElement("span");
  fill.className = "fill";
  fill.style.width = Math.max(0, Math.min(100, 100 * prob)) + "%";
  track.append(fill);
  if (threshold != null) {
    const mark = document.createElement("span");
    mark.className = "mark";
    mark.style.left = 100 * threshold + "%";
    mark.title = "threshold " + percent(threshold);
    track.append(mark);
  }
  const value = document.createElement("span");
  value.className = "value";
  value.textContent = percent(prob);
  li.append(label, track, value);
  return li;
}

function render(item) {
  const node = item.node, record = item.record;
  const bars = node.querySelector(".bars");
  bars.replaceChildren();
  if (Array.isArray(record.predicted)) { // multi-label: the label set, then every class
    node.querySelector(".top-class").textContent = record.predicted.length ? record.predicted.join(", ") : "(no label)";
    node.querySelector(".top-prob").textContent = "";
    const thresholds = (state.info && state.info.thresholds) || {};
    const ranked = Object.entries(record.probabilities).sort((a, b) => b[1] - a[1]);
    for (const [name, prob] of ranked) bars.append(bar(name, prob, record.predicted.includes(name), thresholds[name]));
  } else {
    node.querySelector(".top-class").textContent = record.predicted;
    node.querySelector(".top-prob").textContent = percent(record.score);
    node.querySelector(".uncertain").hidden = !record.uncertain;
    record.top_k.forEach((entry, i) => bars.append(bar(entry.class, entry.prob, i === 0, null)));
  }
  showPicture(item);
}

function showPicture(item) {
  const img = item.node.querySelector("img");
  const overlay = $("gradcam").checked && item.record && item.record.gradcam;
  img.src = overlay ? "data:image/png;base64," + item.record.gradcam.png : item.url;
  img.alt = overlay ? "Grad-CAM of " + item.record.gradcam.class : item.file.name;
}

async function send(items, explain) {
  const form = new FormData();
  for (const item of items) form.append("file", item.file, item.file.name);
  const response = await fetch(`/predict?top_k=${TOP_K}&explain=${explain}`, { method: "POST", body: form });
  let body;
  try { body = await response.json(); } catch (err) { body = { error: `HTTP ${response.status}` }; }
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  body.predictions.forEach((record, i) => { items[i].record = record; render(items[i]); });
}

async function predict(files) {
  showError("");
  const items = [];
  for (const file of files) {
    const node = $("result").content.firstElementChild.cloneNode(true);
    node.querySelector(".file").textContent = file.name;
    node.dataset.file = file.name;
    const item = { file, url: URL.createObjectURL(file), record: null, node };
    node.querySelector("img").src = item.url;
    $("results").prepend(node);
    items.push(item);
  }
  state.items.push(...items);
  const limit = (state.info && state.info.limits && state.info.limits.max_images) || 16;
  for (let start = 0; start < items.length; start += limit) {
    try {
      await send(items.slice(start, start + limit), $("gradcam").checked);
    } catch (err) {
      showError(err.message);
    }
  }
}

$("files").addEventListener("change", (event) => { predict([...event.target.files]); event.target.value = ""; });
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  predict([...event.dataTransfer.files].filter((f) => f.type.startsWith("image/") || f.type === ""));
});
$("gradcam").addEventListener("change", async () => {
  const missing = state.items.filter((item) => item.record && !item.record.gradcam);
  state.items.forEach(showPicture);
  if ($("gradcam").checked && missing.length) {
    try { await send(missing, true); } catch (err) { showError(err.message); }
  }
});
loadInfo();
