// braintumor page: uploads each chosen file to /api/predict?preview=1 and shows the server's answer.
// An explanation is fetched lazily (?explain=1&method=M&mirror=B for that one file) the first time its toggle is
// pressed, because it costs a backward pass; each method's overlay (with and without mirror averaging) is then
// cached on the card. The preview shown for every file is the server's decoded slice, so JPEG, PNG and DICOM
// (which browsers cannot display) look the same.
// Each result has a status: "not_mri" shows no class and no class bars (a plain "not recognised" card, the
// probabilities only behind "show anyway"); "atypical" shows the class with a calm warning; "uncertain" (below
// the server's --min-confidence) says so and shows no class. A volume's card shows its key slice's prediction,
// labelled as that slice's, and the volume's own status and verdict.
"use strict";

(function () {
  const state = { model: null, maxFileBytes: 20 * 1024 * 1024, gradcam: true, active: 0, queue: [],
    methods: ["gradcam"], defaultMethod: "gradcam", defaultMirror: true };
  const PARALLEL_UPLOADS = 2;
  const NOT_RECOGNISED = "Not recognised as a brain MRI slice";
  const methodLabel = (name) => (state.model && state.model.explain_method_labels || {})[name] || name;

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
      state.methods = model.explain_methods || ["gradcam"];
      state.defaultMethod = model.default_explain_method || state.methods[0];
      state.defaultMirror = model.default_explain_mirror !== false;
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

  function score(value) {
    return value === null || value === undefined ? "n/a" : value.toFixed(2);
  }

  function renderResult(card, result) {
    card.dataset.state = "done";
    card.dataset.status = result.status;
    card.dataset.label = result.status === "ok" || result.status === "atypical" ? result.predicted_class : "";
    card.result = result;
    const image = $('[data-testid="slice-image"]', card);
    image.src = `data:image/png;base64,${result.preview_png_base64}`;
    image.alt = `Slice ${result.source} (${result.width} × ${result.height} px) as decoded by the server`;
    image.hidden = false;
    $(".placeholder", card).hidden = true;
    const banner = $('[data-testid="trust-banner"]', card);
    const label = $('[data-testid="predicted-label"]', card);
    const confidence = $('[data-testid="predicted-confidence"]', card);
    const note = $('[data-testid="probabilities-note"]', card);
    const list = $('[data-testid="probabilities"]', card);
    const showAnyway = $('[data-testid="show-probabilities"]', card);
    const inVolume = result.slice_index !== null && result.slice_index !== undefined;
    const slice = inVolume ? `Slice ${result.slice_index}` : "This slice";
    const withheld = result.status === "not_mri" || result.status === "uncertain";
    $(".prediction-label", card).textContent = (inVolume ? `Slice ${result.slice_index} (the volume's most ` +
      "suspicious): " : "") + (withheld ? "result" : "predicted class");
    const shown = result.status === "ok" || result.status === "atypical";
    renderProbabilities(card, result.probabilities, shown ? result.predicted_class : null);
    showAnyway.hidden = true;
    list.hidden = false;
    note.hidden = result.status === "ok" || result.status === "atypical";
    if (result.status === "not_mri") {
      // No class and no class bars: only a plain card, the probabilities behind a toggle.
      label.textContent = NOT_RECOGNISED;
      confidence.textContent = "";
      banner.textContent = `${inVolume ? slice : "This image"} does not look like the brain MRI slices this ` +
        "model was made for, so it " +
        `gives no class (not-MRI score ${score(result.not_mri_score)}; above 1 is not recognised).`;
      list.hidden = true;
      note.hidden = true;
      showAnyway.hidden = false;
      showAnyway.setAttribute("aria-expanded", "false");
      showAnyway.textContent = "Show the probabilities anyway";
    } else if (result.status === "uncertain") {
      label.textContent = "Uncertain";
      confidence.textContent = "";
      banner.textContent = `No class is given: no class reaches the confidence this server requires ` +
        `(${percent(state.model.min_confidence)}).`;
    } else {
      label.textContent = result.predicted_class;
      confidence.textContent = `${percent(result.confidence)} probability` + (inVolume ? " for this slice" : "");
      banner.textContent = result.status === "atypical"
        ? `Note: ${slice.toLowerCase()} is unlike most of the training data (atypical score ` +
          `${score(result.atypical_score)}; above 1 is flagged). The class is given, but check it with more care.`
        : "";
    }
    banner.dataset.kind = result.status;
    banner.hidden = result.status === "ok";
    if (result.volume_prediction) renderVolume(card, result.volume_prediction);
    const toggle = $('[data-testid="gradcam-toggle"]', card);
    const select = $('[data-testid="explain-method"]', card);
    select.replaceChildren(...state.methods.map((name) => {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = methodLabel(name);
      option.selected = name === state.defaultMethod;
      return option;
    }));
    // An explanation of a class is not offered for a slice that gets no class.
    const explainable = state.gradcam && result.status !== "not_mri";
    const mirror = $('[data-testid="explain-mirror"]', card);
    mirror.checked = state.defaultMirror;
    toggle.disabled = !explainable;
    select.disabled = !explainable;
    mirror.disabled = !explainable;
    $(".explain-controls", card).hidden = state.gradcam && !explainable;
    if (!state.gradcam) toggle.title = "Explanations need the PyTorch checkpoint (this server runs an export)";
  }

  // A volume (NIfTI, multi-frame DICOM) is classified slice by slice. Its card shows the key (most suspicious)
  // slice's prediction, labelled as that slice's, and here the volume's own status, verdict and rule.
  function renderVolume(card, volume) {
    const summary = $('[data-testid="volume-summary"]', card);
    summary.replaceChildren();
    const status = document.createElement("span");
    status.className = "volume-status";
    status.dataset.testid = "volume-status";
    status.dataset.status = volume.status;
    const verdict = volume.verdict === null ? NOT_RECOGNISED.toLowerCase() : volume.verdict;
    status.textContent = `Volume: ${verdict}` + (volume.status === "ok" ? "" : ` (status ${volume.status})`);
    const details = document.createElement("span");
    details.textContent = `. ${volume.slices_total} axial slices: ${volume.evidence}. Shown: slice ` +
      `${volume.key_slice}, the most suspicious, with that slice's own probabilities. Rule: ${volume.rule}.`;
    summary.append(status, details);
    summary.hidden = false;
  }

  function toggleProbabilities(card) {
    const button = $('[data-testid="show-probabilities"]', card);
    const open = button.getAttribute("aria-expanded") !== "true";
    button.setAttribute("aria-expanded", String(open));
    button.textContent = open ? "Hide the probabilities" : "Show the probabilities anyway";
    $('[data-testid="probabilities"]', card).hidden = !open;
    $('[data-testid="probabilities-note"]', card).hidden = !open;
  }

  function showExplanation(card, explanation, montage) {
    $(".gradcam-base", card).src = $('[data-testid="slice-image"]', card).src;
    const overlay = $('[data-testid="gradcam-image"]', card);
    overlay.src = `data:image/png;base64,${explanation.heatmap_png_base64}`;
    overlay.alt = `${methodLabel(explanation.method)} heat map for ${card.dataset.filename}: regions that raised ` +
      `the score of ${explanation.target}`;
    overlay.dataset.method = explanation.method;
    if (montage) {
      const picture = $('[data-testid="volume-montage"]', card);
      picture.src = `data:image/png;base64,${montage}`;
      picture.alt = `Explanations of the most suspicious slices of ${card.dataset.filename}`;
      picture.hidden = false;
    }
    const averaged = explanation.mirror ? ", averaged with the mirrored slice's map" : "";
    const block = explanation.layer ? `, read at ${explanation.layer}` : "";  // CAM methods name their block
    $('[data-testid="gradcam-caption"]', card).textContent = `${methodLabel(explanation.method)} for ` +
      `${explanation.target}${averaged}${block}: red marks the strongest evidence, blue none.`;
  }

  async function fetchExplanation(card, file) {
    const method = $('[data-testid="explain-method"]', card).value || state.defaultMethod;
    const mirror = $('[data-testid="explain-mirror"]', card).checked;
    const key = `${method}|${mirror}`;
    card.explanations = card.explanations || {};
    if (!card.explanations[key]) {
      const result = await postFile(file, { explain: "1", method, mirror: String(mirror) });
      card.explanations[key] = { explanation: result.explanation,
        montage: result.volume_prediction ? result.volume_prediction.montage_png_base64 : null };
    }
    const { explanation, montage } = card.explanations[key];
    showExplanation(card, explanation, montage);
  }

  async function toggleGradcam(card, file) {
    const button = $('[data-testid="gradcam-toggle"]', card);
    const panel = $('[data-testid="gradcam-panel"]', card);
    if (button.getAttribute("aria-pressed") === "true") {
      panel.hidden = true;
      card.classList.remove("with-gradcam");
      button.setAttribute("aria-pressed", "false");
      button.textContent = "Show explanation";
      return;
    }
    button.disabled = true;
    button.textContent = "Computing the explanation…";
    try {
      await fetchExplanation(card, file);
    } catch (err) {
      button.disabled = false;
      button.textContent = "Show explanation";
      setStatus(`The explanation failed for ${file.name}: ${err.message}`);
      return;
    }
    button.disabled = false;
    panel.hidden = false;
    card.classList.add("with-gradcam");
    button.setAttribute("aria-pressed", "true");
    button.textContent = "Hide explanation";
  }

  async function changeMethod(card, file) {
    if ($('[data-testid="gradcam-toggle"]', card).getAttribute("aria-pressed") !== "true") return;
    try {
      await fetchExplanation(card, file);
    } catch (err) {
      setStatus(`The explanation failed for ${file.name}: ${err.message}`);
    }
  }

  function makeCard(file) {
    const card = $("#result-template").content.firstElementChild.cloneNode(true);
    card.dataset.filename = file.name;
    card.dataset.state = "pending";
    $('[data-testid="filename"]', card).textContent = file.name;
    $('[data-testid="gradcam-toggle"]', card).addEventListener("click", () => toggleGradcam(card, file));
    $('[data-testid="explain-method"]', card).addEventListener("change", () => changeMethod(card, file));
    $('[data-testid="explain-mirror"]', card).addEventListener("change", () => changeMethod(card, file));
    $('[data-testid="show-probabilities"]', card).addEventListener("click", () => toggleProbabilities(card));
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
    const flagged = [["not_mri", "not recognised"], ["atypical", "atypical"], ["uncertain", "uncertain"]]
      .map(([status, words]) => [count((card) => card.dataset.status === status), words])
      .filter(([n]) => n).map(([n, words]) => `${n} ${words}`);
    const parts = [`${done} analysed`];
    if (flagged.length) parts[0] += ` (${flagged.join(", ")})`;
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
        const { preview_png_base64: _preview, explanation: _explanation, ...rest } = card.result;
        if (rest.volume_prediction) {
          const { montage_png_base64: _montage, ...volume } = rest.volume_prediction;
          rest.volume_prediction = volume;
        }
        return rest;
      });
  }

  function csvCell(value) {
    const text = value === null || value === undefined ? "" : String(value);
    return /[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
  }

  // The results schema's columns (as `braintumor predict --csv`): a volume gives one row per slice.
  function resultsCsv(results) {
    const classes = state.model ? state.model.classes : [];
    const header = ["source", "predicted_class", "confidence", ...classes.map((c) => `p_${c}`), "status",
      "not_mri_score", "atypical_score", "volume", "slice_index"];
    const rows = results.flatMap((r) => (r.volume_prediction ? r.volume_prediction.slices : [r]))
      .map((r) => [r.source, r.predicted_class, r.confidence, ...classes.map((c) => r.probabilities[c]), r.status,
        r.not_mri_score, r.atypical_score, r.volume, r.slice_index]);
    return [header, ...rows].map((row) => row.map(csvCell).join(",")).join("\r\n") + "\r\n";
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
