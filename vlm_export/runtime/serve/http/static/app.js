// The live page of vlm-edge serve: polls /v1/sources every second for rates, timings and
// reservoir fill; follows each source frame by frame (frame.jpg?after=SEQ, whose headers carry
// that frame's decision, so the card shows the decision of the frame on screen); edits the
// classes; teaches the frame on screen. Plain JS, no build step. Every server string is shown
// through textContent (class names are user input).
"use strict";

const POLL_MS = 1000;
const cards = new Map(); // source name -> {root, img, fate, fields}
let fateDefault = false;
let polling = null;

const $ = (id) => document.getElementById(id);

async function api(path, options = {}) {
  // fetch with the session cookie; a 401 opens the login form and throws
  const response = await fetch(path, { credentials: "same-origin", ...options });
  if (response.status === 401) {
    showLogin(true);
    throw new Error("log in first");
  }
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
  if (!response.ok) {
    throw new Error((body && body.error) || `HTTP ${response.status}`);
  }
  return body;
}

function showLogin(visible) {
  $("login").hidden = !visible;
  if (visible) {
    $("status").textContent = "log in to see the sources";
    $("token").focus();
  }
}

function frameUrl(name, after, fate) {
  const base = `/v1/sources/${encodeURIComponent(name)}/frame.jpg?after=${after}`;
  return fate ? `${base}&fate=true` : base;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function showDecision(card, label, score, when) {
  const f = card.fields;
  f.label.textContent = label;
  f.label.dataset.label = label;
  f.label.title = label;
  f.score.textContent = score === null ? "" : number(score, 3);
  f.when.textContent = when ? when.replace("T", " ").replace(/\.\d+/, "") : "";
}

async function follow(card, name) {
  // the live picture, frame by frame: each answer carries its frame's decision, so the card
  // shows what was decided for the frame on screen (and Teach labels exactly that frame)
  while (card.root.isConnected) {
    try {
      const response = await fetch(frameUrl(name, card.seq, card.fate.checked),
        { credentials: "same-origin", cache: "no-store" });
      if (response.status === 401) { showLogin(true); await sleep(1000); continue; }
      if (!response.ok) { await sleep(500); continue; }
      const seq = Number(response.headers.get("X-Frame-Seq"));
      card.img.src = await dataUrl(await response.blob());
      card.seq = seq;
      card.img.dataset.seq = `${seq}`;
      const label = response.headers.get("X-Frame-Class");
      if (label !== null) {
        showDecision(card, decodeURIComponent(label), Number(response.headers.get("X-Frame-Score")),
          response.headers.get("X-Frame-Time"));
      }
    } catch (error) {
      await sleep(1000);
    }
  }
}

function makeCard(name) {
  const root = $("source-card").content.firstElementChild.cloneNode(true);
  root.dataset.source = name;
  const q = (sel) => root.querySelector(sel);
  const card = {
    root,
    img: q(".live"),
    fate: q(".fate"),
    fields: {
      name: q(".name"), state: q(".state"), label: q(".label"), score: q(".score"),
      when: q(".when"), fps: q(".fps"), frames: q(".frames"), dropped: q(".dropped"),
      reconnects: q(".reconnects"), errors: q(".errors"), timings: q(".timings tbody"),
      bars: q(".bars"), fill: q(".fill"),
    },
  };
  card.fields.name.textContent = name;
  card.img.alt = `live view of ${name}`;
  card.fate.checked = fateDefault;
  card.seq = -1;
  card.fate.addEventListener("change", () => { card.img.dataset.fate = `${card.fate.checked}`; });
  root.querySelector(".teach-button").addEventListener("click", () => openTeach(name));
  $("sources").appendChild(root);
  cards.set(name, card);
  follow(card, name);
  return card;
}

function number(value, digits = 1) {
  return typeof value === "number" && isFinite(value) ? value.toFixed(digits) : "–";
}

function renderTimings(tbody, latency) {
  const rows = Object.entries(latency || {});
  tbody.replaceChildren(...rows.map(([stage, stats]) => {
    const tr = document.createElement("tr");
    for (const text of [stage, number(stats && stats.p50, 2), number(stats && stats.p95, 2)]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    }
    return tr;
  }));
}

function renderFill(card, fill, capacity) {
  const { bars } = card.fields;
  if (!fill) {
    card.fields.fill.hidden = true;
    return;
  }
  card.fields.fill.hidden = false;
  const entries = Object.entries(fill);
  const top = capacity || Math.max(1, ...entries.map(([, n]) => n));
  bars.replaceChildren(...entries.map(([name, count]) => {
    const li = document.createElement("li");
    const label = document.createElement("span");
    label.className = "bar-label";
    label.textContent = name;
    label.title = name;
    const track = document.createElement("span");
    track.className = "bar-track";
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.min(100, (100 * count) / top)}%`;
    track.appendChild(bar);
    const value = document.createElement("span");
    value.className = "bar-value";
    value.textContent = capacity ? `${count}/${capacity}` : `${count}`;
    li.append(label, track, value);
    return li;
  }));
}

function render(source) {
  const card = cards.get(source.name) || makeCard(source.name);
  const f = card.fields;
  f.state.textContent = source.state || "";
  f.state.dataset.state = source.state || "";
  if (card.seq < 0) {  // no picture yet: the last decision the service reports
    const last = source.last;
    showDecision(card, last ? last.class : "no decision yet", last ? last.score : null,
      last ? last.time_utc : "");
  }
  f.fps.textContent = number(source.fps);
  f.frames.textContent = `${source.frames ?? 0}`;
  card.root.dataset.frames = `${source.frames ?? 0}`;
  f.dropped.textContent = `${source.dropped ?? 0}`;
  f.reconnects.textContent = `${source.reconnects ?? 0}`;
  f.errors.textContent = `${source.errors ?? 0}`;
  renderTimings(f.timings, source.latency_ms);
  renderFill(card, source.reservoir_fill, source.reservoir_capacity);
}

async function poll() {
  try {
    const body = await api("/v1/sources");
    if (typeof body.fate_overlay === "boolean") fateDefault = body.fate_overlay;
    $("logout").hidden = !body.auth;
    for (const source of body.sources) render(source);
    const failing = body.sources.filter((s) => s.state && s.state !== "running").length;
    const n = body.sources.length;
    $("status").textContent = `${n} source${n === 1 ? "" : "s"}` +
      (failing ? `, ${failing} not running` : ", all running");
    $("status").dataset.ok = failing ? "no" : "yes";
  } catch (error) {
    if ($("login").hidden) {
      $("status").textContent = `cannot reach the service: ${error.message}`;
      $("status").dataset.ok = "no";
    }
  }
}

function message(element, text, isError) {
  element.textContent = text;
  element.classList.toggle("error", Boolean(isError));
  element.classList.toggle("ok", !isError && Boolean(text));
}

async function loadClasses() {
  try {
    const body = await api("/v1/classes");
    $("classes").value = body.classes.join("\n");
    message($("classes-message"), "", false);
    // empty: the bundle's own templates (its recorded name may be a workstation's file path)
    $("templates").value = "";
    $("templates").title = body.templates ? `now: ${body.templates}` : "";
  } catch (error) {
    message($("classes-message"), error.message, true);
  }
}

async function applyClasses(event) {
  event.preventDefault();
  const names = $("classes").value.split("\n").map((s) => s.trim()).filter((s) => s);
  const templates = $("templates").value.trim();
  const body = templates ? { classes: names, templates } : { classes: names };
  $("apply").disabled = true;
  message($("classes-message"), "applying…", false);
  try {
    const result = await api("/v1/classes", {
      method: "PUT",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const dropped = result.dropped_entries ? `, ${result.dropped_entries} reservoir entries dropped` : "";
    message($("classes-message"), `${result.classes.length} classes live${dropped}`, false);
  } catch (error) {
    message($("classes-message"), error.message, true);
  } finally {
    $("apply").disabled = false;
  }
}

async function logIn(event) {
  event.preventDefault();
  try {
    const response = await fetch("/login", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ token: $("token").value }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error || `HTTP ${response.status}`);
    }
    $("token").value = "";
    message($("login-message"), "", false);
    showLogin(false);
    start();
  } catch (error) {
    message($("login-message"), error.message, true);
  }
}

async function logOut() {
  await fetch("/logout", { method: "POST", credentials: "same-origin" });
  location.reload();
}

// ---------------------------------------------------------------- teaching by example
let teaching = null; // {source, seq} of the frame in the teach dialog

function dataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("cannot read the frame"));
    reader.readAsDataURL(blob);
  });
}

async function openTeach(name) {
  // the frame on screen now, frozen with its sequence number: the label lands on exactly it
  const card = cards.get(name);
  $("teach").hidden = false;
  $("teach-source").textContent = name;
  $("teach-submit").disabled = true;
  if (!card || card.seq < 0) {
    message($("teach-message"), "no frame on screen yet", true);
    return;
  }
  teaching = { source: name, seq: card.seq };
  $("teach-frame").src = card.img.src;
  $("teach-frame").dataset.seq = `${card.seq}`;
  message($("teach-message"), "", false);
  $("teach-submit").disabled = false;
  $("teach-label").focus();
  try {
    const classes = await api("/v1/classes");
    $("teach-classes").replaceChildren(...[...classes.classes, "unknown"].map((c) => {
      const option = document.createElement("option");
      option.value = c;
      return option;
    }));
  } catch (error) {
    message($("teach-message"), error.message, true);
  }
}

function closeTeach() {
  $("teach").hidden = true;
  $("teach-label").value = "";
  teaching = null;
}

async function submitTeach(event) {
  event.preventDefault();
  if (!teaching) return;
  const label = $("teach-label").value.trim();
  $("teach-submit").disabled = true;
  message($("teach-message"), "learning…", false);
  try {
    const result = await api("/v1/examples", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ source: teaching.source, seq: teaching.seq, label }),
    });
    message($("examples-message"),
      `learned "${result.label}" (${result.class_examples} example${result.class_examples === 1 ? "" : "s"}, ` +
      `${number(result.learned_ms, 0)} ms)`, false);
    closeTeach();
    loadClasses();
    loadExamples();
  } catch (error) {
    message($("teach-message"), error.message, true);
    $("teach-submit").disabled = false;
  }
}

function chip(text, count) {
  const li = document.createElement("li");
  li.textContent = `${text} `;
  const n = document.createElement("b");
  n.textContent = `${count}`;
  li.appendChild(n);
  li.dataset.label = text;
  return li;
}

function exampleRow(example) {
  const li = document.createElement("li");
  li.dataset.id = example.id;
  const img = document.createElement("img");
  img.alt = example.label;
  if (example.thumbnail) img.src = example.thumbnail;
  const text = document.createElement("span");
  text.className = "example-text";
  const label = document.createElement("b");
  label.textContent = example.label;
  const where = document.createElement("small");
  where.textContent = `${example.source} · ${(example.time_utc || "").replace("T", " ").replace(/\.\d+.*/, "")}`;
  text.append(label, where);
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "quiet delete";
  remove.textContent = "Delete";
  remove.addEventListener("click", () => deleteExample(example));
  li.append(img, text, remove);
  return li;
}

async function loadExamples() {
  try {
    const body = await api("/v1/examples?limit=50");
    $("example-counts").replaceChildren(...Object.entries(body.counts).map(([l, n]) => chip(l, n)));
    $("example-list").replaceChildren(...body.examples.map(exampleRow));
    $("calibration").textContent = body.calibration ? `min score: ${body.calibration}` : "";
  } catch (error) {
    message($("examples-message"), error.message, true);
  }
}

async function deleteExample(example) {
  try {
    const result = await api(`/v1/examples/${example.id}`, { method: "DELETE" });
    message($("examples-message"), `forgot one "${result.label}" (${result.class_examples} left)`, false);
    loadExamples();
  } catch (error) {
    message($("examples-message"), error.message, true);
  }
}

function start() {
  loadClasses();
  loadExamples();
  poll();
  if (polling === null) polling = setInterval(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("classes-form").addEventListener("submit", applyClasses);
  $("login-form").addEventListener("submit", logIn);
  $("logout").addEventListener("click", logOut);
  $("teach-form").addEventListener("submit", submitTeach);
  $("teach-cancel").addEventListener("click", closeTeach);
  start();
});
