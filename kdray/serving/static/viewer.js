// kdray viewer: plain JS over the HTTP API (no build step).
// Flow per image: predict (fast) -> feature maps + class activation maps (each model's own
// variant, HiResCAM by default) of student and teacher -> SHAP.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const state = { models: {}, file: null, seq: 0, audit: null, auditSummary: null };

function esc(text) {  // text from the server into innerHTML (a data folder's name, say)
  const span = document.createElement("span");
  span.textContent = String(text);
  return span.innerHTML;
}

function token() { return localStorage.getItem("kdray-token") || ""; }
function headers() { return token() ? { Authorization: `Bearer ${token()}` } : {}; }

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (response.status === 401) { $("#token-field").hidden = false; }
  if (!response.ok) {
    const reason = body && body.detail ? body.detail : response.statusText;
    throw new Error(`${response.status} · ${reason}`);
  }
  return body;
}

function status(text, error = false) {
  const el = $("#status");
  el.textContent = text;
  el.classList.toggle("error", error);
}

function pct(p) { return `${(100 * p).toFixed(1)}%`; }
function fmt(n) { return n >= 1e9 ? `${(n / 1e9).toFixed(2)} G` : n >= 1e6 ? `${(n / 1e6).toFixed(2)} M` : n >= 1e3 ? `${(n / 1e3).toFixed(1)} k` : `${n}`; }
function png(b64) { return `data:image/png;base64,${b64}`; }

async function loadModels() {
  try {
    const { models } = await api("/v1/models");
    const select = $("#dataset");
    const chosen = select.value;  // a reload (e.g. after the token) keeps the user's choice
    select.innerHTML = "";
    for (const m of models) {
      state.models[m.dataset] = m;
      const option = document.createElement("option");
      option.value = m.dataset;
      option.textContent = m.title || m.dataset;
      select.append(option);
    }
    if (models.some((m) => m.dataset === chosen)) select.value = chosen;
    if (!models.length) status("No model is loaded yet: run `make run`, then reload.", true);
    else if ($("#status").classList.contains("error")) status("");
    renderCards();
  } catch (err) {
    status(`Models: ${err.message}`, true);
  }
}

function renderCards() {
  const m = state.models[$("#dataset").value];
  const cards = $("#cards");
  cards.innerHTML = "";
  if (!m) return;
  for (const [role, entry] of [["Student", m.student], ["Teacher", m.teacher]]) {
    if (!entry) continue;
    const acc = entry.test_metrics.test_accuracy;
    const card = document.createElement("div");
    card.className = "card";
    card.innerHTML = `<h4>${role} · ${entry.registry.name} v${entry.registry.version}</h4>
      <dl><dt>architecture</dt><dd>${entry.architecture}</dd>
      <dt>parameters</dt><dd>${fmt(entry.params)}</dd>
      <dt>FLOPs / image</dt><dd>${fmt(entry.flops)}</dd>
      <dt>test accuracy</dt><dd>${acc === undefined ? "–" : acc.toFixed(3)}</dd>
      <dt>input</dt><dd>${m.image_size} × ${m.image_size}</dd>
      <dt>trained on</dt><dd>${esc(entry.trained_on || "–")}</dd>
      ${entry.data && entry.data.digest ? `<dt>split digest</dt><dd>${esc(entry.data.digest)}</dd>` : ""}</dl>`;
    cards.append(card);
  }
}

function renderProbs(role, probabilities, label) {
  const box = $(`#probs-${role}`);
  box.innerHTML = "";
  $(`#${role}-label`).textContent = label ? `→ ${label}` : "";
  const entries = Object.entries(probabilities);
  const top = Math.max(...entries.map(([, p]) => p));
  for (const [name, p] of entries) {
    const row = document.createElement("div");
    row.className = `prob${p === top ? " top" : ""}`;
    row.innerHTML = `<span class="name">${name}</span><span class="bar"><span style="width:${pct(p)}"></span></span><span class="pct">${pct(p)}</span>`;
    box.append(row);
  }
}

function stack(base, layer, caption) {
  const wrap = document.createElement("div");
  wrap.className = "stack";
  wrap.innerHTML = `<img class="base" alt="input" src="${png(base)}"><img class="heat" alt="${caption}" src="${png(layer)}">`;
  wrap.querySelector(".heat").style.opacity = $("#opacity").value / 100;
  return wrap;
}

function renderMethod(role, explanation, method) {
  const cell = $(`tr[data-method="${method}"] td[data-role="${role}"]`);
  const result = explanation.methods[method];
  if (!cell || !result) return;
  cell.innerHTML = "";
  cell.append(stack(explanation.input_png, result.maps[0].heat_png, `${method} ${role}`));
  const time = document.createElement("div");
  time.className = "time";
  const variant = result.cam_method ? `${CAM_NAMES[result.cam_method] || result.cam_method} · ` : "";
  time.textContent = `${variant}${result.maps[0].layer} · ${result.time_ms.toFixed(1)} ms`;
  cell.append(time);
  if (result.maps[0].blank) {
    // A constant map draws nothing: say so (the server's reason) rather than show the bare image.
    const note = document.createElement("div");
    note.className = "blank";
    note.textContent = `Blank: ${result.maps[0].note || "this map is constant, it points nowhere."}`;
    cell.append(note);
  }
}

function renderStrip(role, explanation) {
  const strip = $(`.strip[data-role="${role}"]`);
  const result = explanation.methods.feature_maps;
  strip.innerHTML = `<div class="who">${role}<br><small>${result ? result.time_ms.toFixed(1) + " ms" : ""}</small></div>`;
  if (!result) return;
  for (const map of result.maps) {
    const figure = document.createElement("figure");
    figure.append(stack(explanation.input_png, map.heat_png, map.layer));
    const caption = document.createElement("figcaption");
    caption.textContent = map.layer.split(".").pop();
    figure.append(caption);
    strip.append(figure);
  }
}

function pending(methods) {
  for (const method of methods) {
    for (const cell of document.querySelectorAll(`tr[data-method="${method}"] td`)) {
      cell.innerHTML = `<div class="pending">computing ${method === "shap" ? "SHAP" : "the CAM"}…</div>`;
    }
  }
}

async function explainStep(dataset, file, methods, seq) {
  const form = new FormData();
  form.append("file", file);
  const result = await api(`/v1/models/${dataset}/explain?model=both&render=layer&methods=${methods.join(",")}`, { method: "POST", body: form });
  if (seq !== state.seq) return null;  // a newer image replaced this one
  for (const role of ["student", "teacher"]) {
    const explanation = result.explanations[role];
    if (!explanation) continue;
    for (const method of methods) {
      if (method === "feature_maps") renderStrip(role, explanation); else renderMethod(role, explanation, method);
    }
  }
  return result;
}

async function run() {
  const file = state.file;
  const dataset = $("#dataset").value;
  if (!file || !dataset) return;
  const seq = ++state.seq;
  $("#explanations").hidden = false;
  $("#prediction").hidden = false;
  pending(["gradcam", "shap"]);
  try {
    status("Predicting…");
    const form = new FormData();
    form.append("file", file);
    const prediction = await api(`/v1/models/${dataset}/predict`, { method: "POST", body: form });
    if (seq !== state.seq) return;
    renderProbs("student", prediction.probabilities, prediction.label);
    status(`Student: ${prediction.label} (${prediction.server_ms.toFixed(1)} ms). Explaining…`);
    const fast = await explainStep(dataset, file, ["feature_maps", "gradcam"], seq);
    if (!fast) return;
    const teacher = fast.explanations.teacher;
    const names = state.models[dataset].classes;
    if (teacher) {
      renderProbs("teacher", Object.fromEntries(names.map((n, i) => [n, teacher.probabilities[i]])), teacher.class_name);
      const badge = $("#agreement");
      badge.hidden = false;
      badge.textContent = fast.agreement ? "teacher and student agree" : "teacher and student disagree";
      badge.className = `badge ${fast.agreement ? "agree" : "disagree"}`;
    }
    const input = fast.explanations.student.input_png;
    $("#preview").src = png(input);
    status("Feature maps and class activation maps ready; computing SHAP…");
    await explainStep(dataset, file, ["shap"], seq);
    if (seq === state.seq) status(`Done: ${dataset}, ${file.name}`);
  } catch (err) {
    if (seq === state.seq) status(err.message, true);
  }
}

function choose(file) {
  if (!file) return;
  state.file = file;
  const preview = $("#preview");
  preview.hidden = false;
  $("#drop-hint").hidden = true;
  if (file.type.startsWith("image/") && !file.type.includes("tiff")) preview.src = URL.createObjectURL(file);
  run();
}


// -- audits: tune/audit.py's runs, read from the server (/v1/audits) --------------------------
const METHOD_NAMES = { gradcam: "Class activation map", feature_maps: "Feature maps", shap: "SHAP" };
const CAM_NAMES = { gradcam: "Grad-CAM", hirescam: "HiResCAM", layercam: "LayerCAM", gradcampp: "Grad-CAM++", xgradcam: "XGrad-CAM" };

function mode(which) {
  $("#image-view").hidden = which !== "image";
  $("#audit-view").hidden = which !== "audit";
  $("#mode-image").classList.toggle("active", which === "image");
  $("#mode-audit").classList.toggle("active", which === "audit");
  if (which === "audit") loadAudits();
}

function auditStatus(text, error = false) {
  const el = $("#audit-status");
  el.textContent = text;
  el.classList.toggle("error", error);
}

async function loadAudits() {
  try {
    const { audits } = await api("/v1/audits");
    const select = $("#audit");
    const chosen = select.value;
    select.innerHTML = "";
    for (const a of audits) {
      const option = document.createElement("option");
      option.value = a.run_id;
      const when = new Date(a.started).toISOString().slice(0, 16).replace("T", " ");
      option.textContent = `${a.dataset} · ${when} · ${a.images} images`;
      select.append(option);
    }
    if (audits.some((a) => a.run_id === chosen)) select.value = chosen;
    if (!audits.length) { auditStatus("No audit yet: run `python tune/audit.py --dataset <id>`."); return; }
    auditStatus("");
    await openAudit(select.value);
  } catch (err) {
    auditStatus(`Audits: ${err.message}`, true);
  }
}

function fixed(v, digits = 3) { return v === undefined || v === null ? "–" : Number(v).toFixed(digits); }

async function openAudit(runId) {
  if (!runId) return;
  state.audit = runId;
  const audit = await api(`/v1/audits/${runId}`);
  if (state.audit !== runId) return;
  state.auditSummary = audit;
  const m = audit.metrics;
  const summary = $("#audit-summary");
  summary.hidden = false;
  const rows = audit.roles.map((r) => `<dt>${r} accuracy</dt><dd>${fixed(m[`${r}.accuracy`])}</dd>
    <dt>${r} ECE</dt><dd>${fixed(m[`${r}.ece`])}</dd>`).join("");
  summary.innerHTML = `<h4>${esc(audit.dataset)} · ${esc(audit.versions.student)}</h4>
    <dl><dt>source</dt><dd>${esc(audit.source)}</dd>
    <dt>images</dt><dd>${m.images} (${m.unreadable} unreadable)</dd>${rows}
    <dt>agreement</dt><dd>${fixed(m["agreement.predictions"])}</dd>
    <dt>speed</dt><dd>${fixed(m.rows_per_s, 1)} images/s</dd></dl>`;
  const box = $("#audit-cases");
  box.innerHTML = "";
  for (const c of audit.cases) {
    const panel = document.createElement("div");
    panel.className = "panel case";
    panel.dataset.kind = c.kind;
    panel.innerHTML = `<div class="panel-head"><h2>${esc(c.title)}</h2><span class="count">${c.matched}</span></div>
      <p class="rule">${esc(c.rule)}</p>`;
    if (!c.rows.length) panel.insertAdjacentHTML("beforeend", `<p class="none">None.</p>`);
    const table = document.createElement("table");
    table.className = "cases";
    for (const row of c.rows) {
      const tr = document.createElement("tr");
      tr.dataset.index = row.index;
      tr.innerHTML = `<td class="idx">${row.index}</td><td class="file">${esc(row.name)}</td><td>${esc(row.why)}</td>`;
      if (c.kind !== "unreadable") {
        tr.className = "clickable";
        tr.addEventListener("click", () => openRow(runId, row.index, row.why));
      }
      table.append(tr);
    }
    panel.append(table);
    box.append(panel);
  }
}

function overlay(input, heat, caption) {
  const wrap = document.createElement("td");
  wrap.append(stack(input, heat, caption));
  return wrap;
}

async function openRow(runId, index, why) {
  try {
    const row = await api(`/v1/audits/${runId}/rows/${index}`);
    const panel = $("#audit-row");
    panel.hidden = false;
    $("#audit-row-title").textContent = `#${row.index} · ${row.name}`;
    $("#audit-row-why").textContent = why || "";
    const badge = $("#audit-row-badge");
    badge.hidden = row.agree === null || row.agree === undefined;
    badge.textContent = row.agree ? "teacher and student agree" : "teacher and student disagree";
    badge.className = `badge ${row.agree ? "agree" : "disagree"}`;
    const body = $("#audit-row-maps");
    body.innerHTML = "";
    for (const method of state.auditSummary.methods) {
      const tr = document.createElement("tr");
      tr.dataset.method = method;
      tr.innerHTML = `<th>${METHOD_NAMES[method] || method}</th>`;
      const input = document.createElement("td");
      input.innerHTML = `<img class="thumb" alt="input" src="${png(row.input_png)}">`;
      tr.append(input);
      for (const role of ["student", "teacher"]) {
        const model = row.models[role];
        const map = model && model.maps[method];
        if (map) tr.append(overlay(row.input_png, map.heat_png, `${method} ${role}`));
        else tr.insertAdjacentHTML("beforeend", `<td class="none">${model ? "not computed" : "–"}</td>`);
      }
      body.append(tr);
    }
    const lines = [`truth: ${row.label || "unlabelled"}`];
    for (const [role, model] of Object.entries(row.models)) {
      const cam = model.maps.gradcam;
      lines.push(`${role}: ${model.label} (${pct(model.confidence)})` +
        (cam && cam.energy_in_mask !== null ? `, CAM energy in mask ${fixed(cam.energy_in_mask, 2)}` : ""));
    }
    if (row.agreement && row.agreement.gradcam) lines.push(`CAM rank correlation ${fixed(row.agreement.gradcam.rank_correlation, 2)}`);
    $("#audit-row-scores").textContent = lines.join(" · ");
    panel.scrollIntoView({ block: "nearest" });
  } catch (err) {
    auditStatus(`Row ${index}: ${err.message}`, true);
  }
}

function init() {
  const drop = $("#drop");
  $("#file").addEventListener("change", (e) => choose(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); choose(e.dataTransfer.files[0]); });
  $("#dataset").addEventListener("change", () => { renderCards(); run(); });
  $("#opacity").addEventListener("input", (e) => {
    for (const img of document.querySelectorAll(".stack .heat")) img.style.opacity = e.target.value / 100;
  });
  // `make serve` prints a link with the token in the fragment (never sent to the server, never
  // in access logs): keep it, then take it out of the address bar and the history.
  const fromLink = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromLink) {
    localStorage.setItem("kdray-token", fromLink);
    history.replaceState(null, "", location.pathname + location.search);
  }
  $("#mode-image").addEventListener("click", () => mode("image"));
  $("#mode-audit").addEventListener("click", () => mode("audit"));
  $("#audit").addEventListener("change", (e) => openAudit(e.target.value));
  $("#token").value = token();
  $("#token").addEventListener("change", (e) => { localStorage.setItem("kdray-token", e.target.value); loadModels(); });
  loadModels();
}

init();
