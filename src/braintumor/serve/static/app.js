// braintumor page: uploads each chosen slice to /api/predict?preview=1 and shows the server's answer.
// Grad-CAM is fetched lazily (?explain=1 for that one file) the first time its toggle is pressed, because it
// costs a backward pass; the overlay is then cached on the card. The preview shown for every file is the
// server's decoded slice, so JPEG, PNG and DICOM (which browsers cannot display) look the same.
"use strict";

(function () {
  const state = { model: null, maxFileBytes: 20 * 1024 * 1024, gradcam: true, active: 0, queue: [] };
  const PARALLEL_UPLOADS = 2;

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
    const image = $('[data-testid="slice-image"]', card);
    image.src = `data:image/png;base64,${result.preview_png_base64}`;
    image.alt = `Slice ${result.filename} (${result.width} × ${result.height} px) as decoded by the server`;
    image.hidden = false;
    $(".placeholder", card).hidden = true;
    $('[data-testid="predicted-label"]', card).textContent = result.label;
    $('[data-testid="predicted-confidence"]', card).textContent = `${percent(result.confidence)} probability`;
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
    const overlay = $('[data-testid="gradcam-image"]', card);
    const slice = $('[data-testid="slice-image"]', card);
    const showing = button.getAttribute("aria-pressed") === "true";
    const caption = $('[data-testid="gradcam-caption"]', card);
    if (showing) {
      overlay.hidden = true;
      caption.hidden = true;
      slice.hidden = false;
      button.setAttribute("aria-pressed", "false");
      button.textContent = "Show Grad-CAM overlay";
      return;
    }
    if (!overlay.getAttribute("src")) {
      button.disabled = true;
      button.textContent = "Computing Grad-CAM…";
      try {
        const result = await postFile(file, { explain: "1" });
        overlay.src = `data:image/png;base64,${result.gradcam_png_base64}`;
        if (result.volume_montage_png_base64) {
          const montage = $('[data-testid="volume-montage"]', card);
          montage.src = `data:image/png;base64,${result.volume_montage_png_base64}`;
          montage.alt = `Grad-CAM of the most suspicious slices of ${result.filename}`;
          montage.hidden = false;
        }
        overlay.alt = `Grad-CAM overlay for ${result.filename}: regions that raised the score of ` +
          `${result.gradcam_target}`;
        caption.textContent = `Grad-CAM for ${result.gradcam_target}: red marks the strongest evidence, ` +
          "blue none.";
      } catch (err) {
        button.disabled = false;
        button.textContent = "Show Grad-CAM overlay";
        setStatus(`Grad-CAM failed for ${file.name}: ${err.message}`);
        return;
      }
      button.disabled = false;
    }
    overlay.hidden = false;
    caption.hidden = false;
    slice.hidden = true;
    button.setAttribute("aria-pressed", "true");
    button.textContent = "Hide Grad-CAM overlay";
  }

  function makeCard(file) {
    const card = $("#result-template").content.firstElementChild.cloneNode(true);
    card.dataset.filename = file.name;
    card.dataset.state = "pending";
    $('[data-testid="filename"]', card).textContent = file.name;
    $('[data-testid="gradcam-toggle"]', card).addEventListener("click", () => toggleGradcam(card, file));
    $("#results").append(card);
    return card;
  }

  function updateStatus() {
    const cards = document.querySelectorAll('[data-testid="result"]');
    const pending = [...cards].filter((card) => card.dataset.state === "pending").length;
    const failed = [...cards].filter((card) => card.dataset.state === "error").length;
    let text = pending ? `Analysing ${pending} of ${cards.length} file(s)…` : `${cards.length} file(s) analysed`;
    if (failed) text += `, ${failed} could not be read`;
    setStatus(`${text}.`);
    $("#clear-button").disabled = cards.length === 0;
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
    $("#clear-button").addEventListener("click", () => {
      state.queue.length = 0;
      $("#results").replaceChildren();
      setStatus("");
      $("#clear-button").disabled = true;
    });
    loadModel();
  });
})();
