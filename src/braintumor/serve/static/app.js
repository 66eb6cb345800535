// braintumor page: uploads each chosen slice to /api/predict?preview=1 and shows the server's answer.
// Grad-CAM is fetched lazily (?explain=1 for that one file) the first time its toggle is pressed, because it
// costs a backward pass; the overlay is then cached on the card. The preview shown for every file is the
// server's decoded slice, so JPEG, PNG and DICOM (which browsers cannot display) look the same.
// A slice the model's out-of-distribution check rejects shows no class ("not recognised"), one below the
// server's --min-confidence shows "uncertain"; both keep their probabilities, marked as for reference only.
"use strict";

(function () {
  const state = { model: null, maxFileBytes: 20 * 1024 * 1024, gradcam: true, active: 0, queue: [] };
  const PARALLEL_UPLOADS = 2;
  const NOT_RECOGNISED = "Not recognised as a brain MRI slice like the training data";

  const $ = (selector, root = document) => root.querySelector(selector);

  function formatBytes(n) {
    if (n >= 1024 * 1024) return `${(n / (1024 * 1024)).toFixed(n % (1024 * 1024) ? 1 : 0)} MiB`;
    if (n >= 1024) return `${(n / 1024).toFixed(0)} KiB`;
    return `${n} bytes`;
  }

  function percent(p) {
    return `${(100 * p).toFixed(1)}%`;
  }

  function setStatus(text) {
    $("#status").textContent = text;
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (typeof body.detail === "string") return body.detail;
      return JSON.stringify(body.detail);
    } catch (err) {
      return `${response.status} ${response.statusText}`;
    }
  }

  async function loadModel() {
    try {
      const response = await fetch("/api/model");
      if (!response.ok) throw new Error(await errorMessage(response));
      const model = await response.json();
      state.model = model;
      state.maxFileBytes = model.limits.max_file_bytes;
      state.gradcam = model.gradcam;
      $('[data-testid="model-arch"]').textContent = model.arch;
      $('[data-testid="model-image-size"]').textContent = `${model.image_size} × ${model.image_size} px`;
      $('[data-testid="model-classes"]').textContent = model.classes.join(", ");
      $('[data-testid="model-fingerprint"]').textContent = model.fingerprint || "(unknown)";
      $('[data-testid="model-ood"]').textContent = model.ood_detector
        ? `on; probabilities calibrated (temperature ${model.temperature.toFixed(2)})` +
          (model.min_confidence > 0 ? `; uncertain below ${percent(model.min_confidence)}` : "")
        : "none: this model's predictions are not checked (run braintumor calibrate)";
      $("#limit-size").textContent = formatBytes(state.maxFileBytes);
      document.body.dataset.ready = "true";
    } catch (err) {
      setStatus(`Could not load the model description: ${err.message}`);
    }
  }

  function predictUrl(params) {
    return `/api/predict?${new URLSearchParams(params).toString()}`;
  }

  async function postFile(file, params) {
    const form = new FormData();
    form.append("files", file, file.name);
    const response = await fetch(predictUrl(params), { method: "POST", body: form });
    if (!response.ok) throw new Error(await errorMessage(response));
    return (await response.json()).results[0];
  }

  function showError(card, message) {
    card.classList.add("failed");
    card.dataset.state = "error";
    $(".placeholder", card).textContent = "No result";
    $('[data-testid="predicted-label"]', card).textContent = "—";
    const error = $('[data-testid="result-error"]', card);
    error.textContent = message;
    error.hidden = false;
  }

  function renderProbabilities(card, probabilities, label) {
    const list = $('[data-testid="probabilities"]', card);
    list.replaceChildren();
    for (const [name, p] of Object.entries(probabilities)) {
      const item = document.createElement("li");
      item.className = name === label ? "probability top" : "probability";
      item.dataset.testid = "probability";
      item.dataset.class = name;
      item.dataset.probability = String(p);

      const text = document.createElement("div");
      text.className = "probability-text";
      const className = document.createElement("span");
      className.className = "probability-class";
      className.textContent = name;
      const value = document.createElement("span");
      value.className = "probability-value";
      value.dataset.testid = "probability-value";
      value.textContent = percent(p);
      text.append(className, value);

      const bar = document.createElement("div");
      bar.className = "bar";
      bar.setAttribute("aria-hidden", "true");
      const fill = document.createElement("div");
      fill.className = "bar-fill";
      fill.style.width = `${Math.max(0, Math.min(100, 100 * p))}%`;
      bar.append(fill);

      item.append(text, bar);
      list.append(item);
    }
  }

  function renderResult(card, result) {
    card.dataset.state = "done";
    card.dataset.label = result.label;
    card.dataset.status = result.status;
    card.result = result;
    const image = $('[data-testid="slice-image"]', card);
    image.src = `data:image/png;base64,${result.preview_png_base64}`;
    image.alt = `Slice ${result.filename} (${result.width} × ${result.height} px) as decoded by the server`;
    image.hidden = false;
    $(".placeholder", card).hidden = true;
    const banner = $('[data-testid="trust-banner"]', card);
    const label = $('[data-testid="predicted-label"]', card);
    const confidence = $('[data-testid="predicted-confidence"]', card);
    if (result.status === "out_of_distribution") {
      label.textContent = "Not recognised";
      confidence.textContent = "";
      banner.textContent = `${NOT_RECOGNISED} (out-of-distribution score ${result.ood_score.toFixed(2)}, ` +
        "above 1). No class is given; the model was not made for images like this.";
    } else if (result.status === "low_confidence") {
      label.textContent = "Uncertain";
      confidence.textContent = `most probable: ${result.label}, ${percent(result.confidence)}`;
      banner.textContent = `Below the confidence this server requires (${percent(state.model.min_confidence)}): ` +
        "no class is given.";
    } else {
      label.textContent = result.label;
      confidence.textContent = `${percent(result.confidence)} probability`;
    }
    banner.hidden = result.status === "ok";
    $('[data-testid="probabilities-note"]', card).hidden = result.status === "ok";
    renderProbabilities(card, result.probabilities, result.label);
    if (result.volume) renderVolume(card, result.volume);
    const toggle = $('[data-testid="gradcam-toggle"]', card);
    toggle.disabled = !state.gradcam;
    if (!state.gradcam) toggle.title = "Grad-CAM needs the PyTorch checkpoint (this server runs an ONNX export)";
  }

  // A volume (NIfTI, multi-frame DICOM) is classified slice by slice; the card shows its most suspicious slice,
  // the verdict as the label, and how the verdict was reached.
  function renderVolume(card, volume) {
    $(".prediction-label", card).textContent = "Volume verdict";
    const summary = $('[data-testid="volume-summary"]', card);
    summary.textContent = `${volume.slices_total} axial slices: ${volume.evidence}. Shown: slice ` +
      `${volume.key_slice}, the most suspicious, with its probabilities. Rule: ${volume.rule}.`;
    summary.hidden = false;
  }

  async function toggleGradcam(card, file) {
    const button = $('[data-testid="gradcam-toggle"]', card);
    const panel = $('[data-testid="gradcam-panel"]', card);
    const overlay = $('[data-testid="gradcam-image"]', card);
    const caption = $('[data-testid="gradcam-caption"]', card);
    if (button.getAttribute("aria-pressed") === "true") {
      panel.hidden = true;
      card.classList.remove("with-gradcam");
      button.setAttribute("aria-pressed", "false");
      button.textContent = "Show Grad-CAM";
      return;
    }
    if (!overlay.getAttribute("src")) {
      button.disabled = true;
      button.textContent = "Computing Grad-CAM…";
      try {
        const result = await postFile(file, { explain: "1" });
        $(".gradcam-base", card).src = $('[data-testid="slice-image"]', card).src;
        overlay.src = `data:image/png;base64,${result.gradcam_heatmap_png_base64}`;
        overlay.alt = `Grad-CAM heat map for ${result.filename}: regions that raised the score of ` +
          `${result.gradcam_target}`;
        if (result.volume_montage_png_base64) {
          const montage = $('[data-testid="volume-montage"]', card);
          montage.src = `data:image/png;base64,${result.volume_montage_png_base64}`;
          montage.alt = `Grad-CAM of the most suspicious slices of ${result.filename}`;
          montage.hidden = false;
        }
        caption.textContent = `Grad-CAM for ${result.gradcam_target}: red marks the strongest evidence, ` +
          "blue none.";
      } catch (err) {
        button.disabled = false;
        button.textContent = "Show Grad-CAM";
        setStatus(`Grad-CAM failed for ${file.name}: ${err.message}`);
        return;
      }
      button.disabled = false;
    }
    panel.hidden = false;
    card.classList.add("with-gradcam");
    button.setAttribute("aria-pressed", "true");
    button.textContent = "Hide Grad-CAM";
  }

  function makeCard(file) {
    const card = $("#result-template").content.firstElementChild.cloneNode(true);
    card.dataset.filename = file.name;
    card.dataset.state = "pending";
    $('[data-testid="filename"]', card).textContent = file.name;
    $('[data-testid="gradcam-toggle"]', card).addEventListener("click", () => toggleGradcam(card, file));
    const opacity = $('[data-testid="gradcam-opacity"]', card);
    opacity.addEventListener("input", () => {
      $('[data-testid="gradcam-image"]', card).style.opacity = String(opacity.value / 100);
    });
    $("#results").append(card);
    return card;
  }

  function updateStatus() {
    const cards = [...document.querySelectorAll('[data-testid="result"]')];
    const count = (predicate) => cards.filter(predicate).length;
    const pending = count((card) => card.dataset.state === "pending");
    const done = count((card) => card.dataset.state === "done");
    const failed = count((card) => card.dataset.state === "error");
    const rejected = count((card) => card.dataset.status === "out_of_distribution");
    const uncertain = count((card) => card.dataset.status === "low_confidence");
    const parts = [`${done} analysed`];
    if (rejected || uncertain) {
      parts[0] += ` (${[rejected && `${rejected} not recognised`, uncertain && `${uncertain} uncertain`]
        .filter(Boolean).join(", ")})`;
    }
    parts.push(`${failed} unreadable`);
    if (pending) parts.push(`${pending} in progress`);
    setStatus(`${cards.length} file(s): ${parts.join(", ")}.`);
    $("#clear-button").disabled = cards.length === 0;
    $("#download-json").disabled = done === 0;
    $("#download-csv").disabled = done === 0;
  }

  function collectResults() {
    return [...document.querySelectorAll('[data-testid="result"]')]
      .filter((card) => card.result)
      .map((card) => {
        const { preview_png_base64: _preview, ...rest } = card.result;
        return rest;
      });
  }

  function csvCell(value) {
    const text = value === null || value === undefined ? "" : String(value);
    return /[",\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
  }

  function resultsCsv(results) {
    const classes = state.model ? state.model.classes : [];
    const header = ["filename", "status", "label", "confidence", ...classes, "ood_score", "out_of_distribution"];
    const rows = results.map((r) => [r.filename, r.status, r.label, r.confidence,
      ...classes.map((c) => r.probabilities[c]), r.ood_score, r.out_of_distribution]);
    return [header, ...rows].map((row) => row.map(csvCell).join(",")).join("\n") + "\n";
  }

  function download(name, type, text) {
    const url = URL.createObjectURL(new Blob([text], { type }));
    const link = document.createElement("a");
    link.href = url;
    link.download = name;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  }

  async function runQueue() {
    while (state.active < PARALLEL_UPLOADS && state.queue.length) {
      const { file, card } = state.queue.shift();
      state.active += 1;
      postFile(file, { preview: "1" })
        .then((result) => renderResult(card, result))
        .catch((err) => showError(card, err.message))
        .finally(() => {
          state.active -= 1;
          updateStatus();
          runQueue();
        });
    }
  }

  function addFiles(fileList) {
    const files = [...fileList];
    if (!files.length) return;
    for (const file of files) {
      const card = makeCard(file);
      if (file.size > state.maxFileBytes) {
        showError(card, `${file.name} is ${formatBytes(file.size)}, over the limit of ` +
          `${formatBytes(state.maxFileBytes)} per file.`);
        continue;
      }
      state.queue.push({ file, card });
    }
    updateStatus();
    runQueue();
  }

  function setUpDropZone() {
    const zone = $("#drop-zone");
    const input = $("#file-input");
    input.addEventListener("change", () => {
      addFiles(input.files);
      input.value = "";  // choosing the same file again fires "change" again
    });
    for (const type of ["dragenter", "dragover"]) {
      zone.addEventListener(type, (event) => {
        event.preventDefault();
        zone.classList.add("dragging");
      });
    }
    for (const type of ["dragleave", "drop"]) {
      zone.addEventListener(type, () => zone.classList.remove("dragging"));
    }
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      addFiles(event.dataTransfer.files);
    });
    // A file dropped beside the zone would otherwise make the browser navigate away to it.
    window.addEventListener("dragover", (event) => event.preventDefault());
    window.addEventListener("drop", (event) => event.preventDefault());
  }

  document.addEventListener("DOMContentLoaded", () => {
    setUpDropZone();
    $("#download-json").addEventListener("click", () => download(
      "braintumor-results.json", "application/json",
      JSON.stringify({ model: state.model, results: collectResults() }, null, 2)));
    $("#download-csv").addEventListener("click", () => download(
      "braintumor-results.csv", "text/csv", resultsCsv(collectResults())));
    $("#clear-button").addEventListener("click", () => {
      state.queue.length = 0;
      $("#results").replaceChildren();
      setStatus("");
      $("#clear-button").disabled = true;
      $("#download-json").disabled = true;
      $("#download-csv").disabled = true;
    });
    loadModel();
  });
})();
