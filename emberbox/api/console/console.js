// The emberbox web console (docs/console.md): one module, no framework, no build step.
//
// Every call is the public REST API with `Authorization: Bearer <key>`; the key lives in
// this tab's sessionStorage only (never a URL, a cookie or localStorage). The terminal
// is xterm.js (served from ./vendor/, installed by scripts/console-assets.sh) on the
// PTY WebSocket, opened with a single-use ticket offered as a subprotocol, because a
// browser cannot send headers on a WebSocket. Text from the server is always set with
// textContent, never parsed as HTML.

const KEY_ITEM = "emberbox.apiKey";
const REFRESH_MS = 3000;
const OWNERS_MIN_MS = 5000; // re-read the owners (admins) at most this often
const KILL_CONFIRM_MS = 4000;
const MISSING_ASSETS =
  "The terminal's files (xterm.js) are not installed on this server: " +
  "run scripts/console-assets.sh (part of make setup).";

const $ = (id) => document.getElementById(id);
const enc = encodeURIComponent;

const state = {
  admin: false,
  sandboxes: [],
  owners: new Map(), // sandbox id -> tenant name (admins, from the audit log)
  ownersAt: 0,
  selected: null,
  skewMs: 0, // server clock - ours, from the Date header
  timers: [],
  listing: false,
  terminal: null,
  filesPath: "/tmp",
  killArmed: null,
  xtermMissing: false,
};

// --- the API ---------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, type, message) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

function storedKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

async function api(method, path, { json, body, raw = false, key = storedKey() } = {}) {
  const headers = new Headers();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  if (json !== undefined) {
    headers.set("Content-Type", "application/json");
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body, cache: "no-store", credentials: "omit" });
  } catch (error) {
    throw new ApiError(0, "NetworkError", `cannot reach the server (${error.message})`);
  }
  if (!response.ok) throw await apiError(response);
  noteClock(response);
  if (raw) return response;
  return response.status === 204 ? null : response.json();
}

async function apiError(response) {
  let type = `HTTP ${response.status}`;
  let message = response.statusText || "request failed";
  try {
    const error = (await response.json()).error;
    if (error && error.message) {
      type = error.type || type;
      message = error.message;
    }
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, type, message);
}

function noteClock(response) {
  const date = Date.parse(response.headers.get("Date") || "");
  if (!Number.isNaN(date)) state.skewMs = date - Date.now();
}

const serverNow = () => Date.now() + state.skewMs;

// --- small helpers ---------------------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "className") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

function showMessage(text, kind = "error") {
  const box = $("message");
  box.textContent = text;
  box.className = kind === "error" ? "" : "info";
  box.hidden = false;
}

function clearMessage() {
  $("message").hidden = true;
}

function span(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1 << 30) return `${(n / (1 << 20)).toFixed(1)} MiB`;
  return `${(n / (1 << 30)).toFixed(1)} GiB`;
}

const when = (iso) => new Date(iso).toLocaleString();
const joinPath = (dir, name) => (dir.endsWith("/") ? dir + name : `${dir}/${name}`);
const parentPath = (path) => path.replace(/\/+$/, "").replace(/\/[^/]*$/, "") || "/";

// Report a failed call; a refused key ends the session.
function failed(error, where) {
  if (error instanceof ApiError && error.status === 401 && error.type === "Unauthorized") {
    signOut(`Signed out: the server refused the key (${error.message}).`);
    return;
  }
  const text = error instanceof ApiError ? `${error.type}: ${error.message}` : String(error);
  showMessage(where ? `${where}: ${text}` : text);
}

// --- signing in and out ----------------------------------------------------------------

function describeKey(key) {
  if (!key) return "local mode (no key)";
  const match = /^eb_([0-9a-f]{12})_/.exec(key);
  return match ? `key ${match[1]}` : "the server's key";
}

async function signIn(key) {
  await api("GET", "/v1/sandboxes", { key }); // throws for a wrong key
  sessionStorage.setItem(KEY_ITEM, key);
  try {
    await api("GET", "/v1/audit?limit=1");
    state.admin = true;
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) throw error;
    state.admin = false;
  }
  enterApp(key);
}

function enterApp(key) {
  clearMessage();
  $("signin-view").hidden = true;
  $("app-view").hidden = false;
  $("who").textContent = `${describeKey(key)}${state.admin ? " · admin" : ""}`;
  $("who").hidden = false;
  $("sign-out").hidden = false;
  document.body.classList.toggle("not-admin", !state.admin);
  $("audit").hidden = !state.admin;
  loadImages();
  checkXterm();
  refreshSandboxes();
  state.timers.push(setInterval(refreshSandboxes, REFRESH_MS));
  state.timers.push(setInterval(tick, 1000));
}

function signOut(why) {
  sessionStorage.removeItem(KEY_ITEM);
  state.timers.forEach(clearInterval);
  state.timers = [];
  closeTerminal();
  closeDetail();
  state.sandboxes = [];
  state.owners.clear();
  state.admin = false;
  $("app-view").hidden = true;
  $("who").hidden = true;
  $("sign-out").hidden = true;
  $("signin-view").hidden = false;
  $("api-key").value = "";
  if (why) showMessage(why);
  else clearMessage();
}

async function onSignIn(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  const problem = $("signin-error");
  problem.hidden = true;
  const button = event.submitter || $("signin-form").querySelector("button");
  button.disabled = true;
  try {
    await signIn(key);
  } catch (error) {
    sessionStorage.removeItem(KEY_ITEM);
    problem.textContent =
      error instanceof ApiError && error.status === 401
        ? `Sign-in failed: ${error.message}`
        : `Sign-in failed: ${error.type || "Error"}: ${error.message}`;
    problem.hidden = false;
  } finally {
    button.disabled = false;
  }
}

// --- images and creating ---------------------------------------------------------------

async function loadImages() {
  try {
    const images = await api("GET", "/v1/images");
    const select = $("create-image");
    select.replaceChildren(
      ...images.map((image) =>
        el("option", image.default ? { value: image.name, selected: "" } : { value: image.name }, image.name),
      ),
    );
  } catch (error) {
    failed(error, "images");
  }
}

async function onCreate(event) {
  event.preventDefault();
  const body = { image: $("create-image").value || null };
  for (const [field, id] of [["vcpus", "create-vcpus"], ["memory_mib", "create-memory"], ["timeout_s", "create-timeout"]]) {
    const value = $(id).value.trim();
    if (value) body[field] = Number(value);
  }
  const button = $("create-button");
  button.disabled = true;
  $("create-status").textContent = "booting…";
  try {
    const sandbox = await api("POST", "/v1/sandboxes", { json: body });
    $("create-status").textContent = `created ${sandbox.id}`;
    await refreshSandboxes();
    select(sandbox.id);
  } catch (error) {
    $("create-status").textContent = "";
    failed(error, "create");
  } finally {
    button.disabled = false;
  }
}

// --- the sandbox list ------------------------------------------------------------------

async function refreshSandboxes() {
  if (state.listing) return;
  state.listing = true;
  try {
    const data = await api("GET", "/v1/sandboxes");
    state.sandboxes = data.sandboxes;
    if (state.admin) await refreshOwners();
    renderSandboxes();
    if (state.admin) await refreshAudit();
    $("refreshed").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    failed(error, "list");
  } finally {
    state.listing = false;
  }
}

// Owners are tenants; the API's sandbox view does not name them, the audit log does.
async function refreshOwners() {
  const unknown = state.sandboxes.some((s) => !state.owners.has(s.id));
  if (!unknown || Date.now() - state.ownersAt < OWNERS_MIN_MS) return;
  state.ownersAt = Date.now();
  const log = await api("GET", "/v1/audit?action=sandbox.create&limit=1000");
  for (const entry of log.entries) {
    if (entry.target_id && entry.outcome === "ok") state.owners.set(entry.target_id, entry.tenant);
  }
}

function visibleSandboxes() {
  const stopped = $("show-stopped").checked;
  return state.sandboxes.filter((s) => stopped || s.state !== "stopped");
}

function renderSandboxes() {
  const rows = visibleSandboxes().map((s) =>
    el(
      "tr",
      {
        dataset: { id: s.id },
        className: s.id === state.selected ? "selected" : "",
        onclick: () => select(s.id),
      },
      el("td", {}, el("code", {}, s.id)),
      el("td", {}, el("span", { className: `state state-${s.state}` }, s.state)),
      el("td", {}, s.image),
      el("td", { className: "owner-col" }, state.owners.get(s.id) ?? "—"),
      el("td", { className: "age", dataset: { since: s.created_at } }, ""),
      el("td", { className: "left", dataset: { until: s.expires_at, state: s.state } }, ""),
      el("td", {}, `${s.vcpus} vCPU · ${s.memory_mib} MiB${s.ip_address ? ` · ${s.ip_address}` : ""}`),
    ),
  );
  $("sandboxes").tBodies[0].replaceChildren(...rows);
  $("no-sandboxes").hidden = rows.length > 0;
  tick();
  renderDetailState();
}

// Age and time left move every second without asking the server.
function tick() {
  const now = serverNow();
  for (const cell of document.querySelectorAll("#sandboxes td.age")) {
    cell.textContent = span((now - Date.parse(cell.dataset.since)) / 1000);
  }
  for (const cell of document.querySelectorAll("#sandboxes td.left")) {
    const live = ["creating", "running", "paused"].includes(cell.dataset.state);
    cell.textContent = live ? span((Date.parse(cell.dataset.until) - now) / 1000) : "—";
  }
}

// --- one sandbox -----------------------------------------------------------------------

const current = () => state.sandboxes.find((s) => s.id === state.selected);

function select(id) {
  if (state.selected !== id) {
    closeTerminal();
    state.selected = id;
    state.filesPath = "/tmp";
    $("files-path").value = state.filesPath;
    $("files").tBodies[0].replaceChildren();
    $("files-status").textContent = "";
    $("action-status").textContent = "";
    showTab("terminal");
  }
  $("detail").hidden = false;
  for (const row of $("sandboxes").tBodies[0].rows) row.classList.toggle("selected", row.dataset.id === id);
  renderDetailState();
}

function closeDetail() {
  closeTerminal();
  state.selected = null;
  $("detail").hidden = true;
}

function renderDetailState() {
  if (!state.selected) return;
  const sandbox = current();
  const name = sandbox ? sandbox.state : "gone";
  $("detail-id").textContent = state.selected;
  $("detail-state").textContent = name;
  $("detail-state").className = `state state-${name}`;
  const running = name === "running";
  $("action-kill").disabled = !sandbox || name === "stopped";
  $("action-pause").disabled = !running;
  $("action-resume").disabled = name !== "paused";
  $("action-snapshot").disabled = !running;
  $("terminal-open").disabled = !running || state.xtermMissing;
}

async function act(label, method, suffix, json) {
  const id = state.selected;
  $("action-status").textContent = `${label}…`;
  try {
    await api(method, `/v1/sandboxes/${enc(id)}${suffix}`, { json });
    $("action-status").textContent = `${label}: done`;
  } catch (error) {
    $("action-status").textContent = "";
    failed(error, label);
  }
  await refreshSandboxes();
}

function onKill() {
  const button = $("action-kill");
  if (state.killArmed !== state.selected) {
    state.killArmed = state.selected;
    button.textContent = "Really kill?";
    setTimeout(() => {
      state.killArmed = null;
      button.textContent = "Kill";
    }, KILL_CONFIRM_MS);
    return;
  }
  state.killArmed = null;
  button.textContent = "Kill";
  closeTerminal();
  act("kill", "DELETE", "");
}

async function onSnapshot() {
  const id = state.selected;
  $("action-status").textContent = "snapshot…";
  try {
    const snapshot = await api("POST", `/v1/sandboxes/${enc(id)}/snapshots`);
    $("action-status").textContent = `snapshot ${snapshot.id} (${bytes(snapshot.size_bytes)})`;
  } catch (error) {
    $("action-status").textContent = "";
    failed(error, "snapshot");
  }
  await refreshSandboxes();
}

function onTimeout(event) {
  event.preventDefault();
  act("timeout", "POST", "/timeout", { timeout_s: Number($("timeout-value").value) });
}

function showTab(name) {
  for (const button of document.querySelectorAll(".tabs button")) {
    button.setAttribute("aria-selected", String(button.dataset.tab === name));
  }
  for (const tab of ["terminal", "files", "execs"]) $(`tab-${tab}`).hidden = tab !== name;
  if (name === "files") listFiles(state.filesPath);
  if (name === "execs") refreshExecs();
  if (name === "terminal" && state.terminal) state.terminal.fit.fit();
}

// --- the terminal ----------------------------------------------------------------------

// Say at once when the server has no xterm.js, rather than when a terminal is opened.
async function checkXterm() {
  let found;
  try {
    found = (await fetch("vendor/xterm.mjs", { method: "HEAD", cache: "no-store" })).ok;
  } catch {
    return; // the server is unreachable: the list says so
  }
  state.xtermMissing = !found;
  $("terminal-missing").textContent = found ? "" : MISSING_ASSETS;
  $("terminal-missing").hidden = found;
  renderDetailState();
}

async function loadXterm() {
  const [{ Terminal }, { FitAddon }] = await Promise.all([
    import("./vendor/xterm.mjs"),
    import("./vendor/addon-fit.mjs"),
  ]);
  return { Terminal, FitAddon };
}

async function openTerminal() {
  const id = state.selected;
  closeTerminal();
  const status = $("terminal-status");
  let xterm;
  try {
    xterm = await loadXterm();
  } catch {
    status.textContent = "";
    showMessage(MISSING_ASSETS);
    return;
  }
  let ticket;
  try {
    ticket = await api("POST", `/v1/sandboxes/${enc(id)}/pty/ticket`);
  } catch (error) {
    failed(error, "terminal");
    return;
  }
  const term = new xterm.Terminal({
    cursorBlink: true,
    fontSize: 14,
    fontFamily: '"DejaVu Sans Mono", ui-monospace, monospace',
    scrollback: 2000,
  });
  const fit = new xterm.FitAddon();
  term.loadAddon(fit);
  const box = $("terminal");
  box.replaceChildren();
  term.open(box);
  fit.fit();

  const url = new URL(`/v1/sandboxes/${enc(id)}/pty`, location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.searchParams.set("cols", term.cols);
  url.searchParams.set("rows", term.rows);
  const socket = new WebSocket(url, ticket.protocols);
  socket.binaryType = "arraybuffer";
  const encoder = new TextEncoder();
  const observer = new ResizeObserver(() => fit.fit());
  observer.observe(box);
  state.terminal = { id, term, fit, socket, observer };
  status.textContent = "connecting…";
  $("terminal-open").hidden = true;
  $("terminal-close").hidden = false;

  socket.addEventListener("message", (event) => {
    if (typeof event.data !== "string") {
      term.write(new Uint8Array(event.data));
      return;
    }
    const message = JSON.parse(event.data);
    if (message.type === "started") status.textContent = `connected (pid ${message.pid})`;
    else if (message.type === "exit") status.textContent = `program ended (exit ${message.exit_code ?? "?"})`;
    else if (message.type === "error") status.textContent = `${message.error.type}: ${message.error.message}`;
  });
  socket.addEventListener("open", () => term.focus());
  socket.addEventListener("close", (event) => {
    if (!status.textContent.startsWith("program ended") && event.code !== 1000) {
      status.textContent = `closed (${event.code}${event.reason ? `: ${event.reason}` : ""})`;
    }
    if (state.terminal && state.terminal.socket === socket) {
      $("terminal-open").hidden = false;
      $("terminal-close").hidden = true;
    }
  });
  term.onData((data) => {
    if (socket.readyState === WebSocket.OPEN) socket.send(encoder.encode(data));
  });
  term.onResize(({ cols, rows }) => {
    if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "resize", cols, rows }));
  });
}

function closeTerminal() {
  const open = state.terminal;
  if (!open) return;
  state.terminal = null;
  open.observer.disconnect();
  open.socket.close(1000);
  open.term.dispose();
  $("terminal").replaceChildren();
  $("terminal-status").textContent = "";
  $("terminal-open").hidden = false;
  $("terminal-close").hidden = true;
}

// --- files -----------------------------------------------------------------------------

const filesUrl = (path) => `/v1/sandboxes/${enc(state.selected)}/files?path=${enc(path)}`;

async function listFiles(path) {
  const status = $("files-status");
  status.textContent = "listing…";
  try {
    const response = await api("GET", filesUrl(path), { raw: true });
    if (!(response.headers.get("Content-Type") || "").includes("json")) {
      await response.body?.cancel();
      status.textContent = `${path} is a file`;
      return;
    }
    const listing = await response.json();
    state.filesPath = listing.path;
    $("files-path").value = listing.path;
    renderFiles(listing.entries);
    status.textContent = `${listing.entries.length} entries`;
  } catch (error) {
    status.textContent = "";
    failed(error, "files");
  }
}

function renderFiles(entries) {
  const dirsFirst = (a, b) => (b.type === "dir") - (a.type === "dir") || a.name.localeCompare(b.name);
  const open = (entry) => (event) => {
    event.preventDefault();
    listFiles(joinPath(state.filesPath, entry.name));
  };
  const rows = [...entries].sort(dirsFirst).map((entry) => {
    const name = entry.type === "dir" ? el("a", { href: "#", onclick: open(entry) }, `${entry.name}/`) : entry.name;
    const action =
      entry.type === "file"
        ? el("button", { type: "button", className: "download", onclick: () => download(entry) }, "Download")
        : "";
    return el(
      "tr",
      { dataset: { name: entry.name } },
      el("td", { className: "mono" }, name),
      el("td", {}, entry.type),
      el("td", {}, entry.type === "file" ? bytes(entry.size) : ""),
      el("td", { className: "mono" }, entry.mode.toString(8).padStart(4, "0")),
      el("td", {}, new Date(entry.mtime * 1000).toLocaleString()),
      el("td", {}, action),
    );
  });
  $("files").tBodies[0].replaceChildren(...rows);
}

async function download(entry) {
  const status = $("files-status");
  status.textContent = `downloading ${entry.name}…`;
  try {
    const response = await api("GET", filesUrl(entry.path), { raw: true });
    const blob = await response.blob();
    const href = URL.createObjectURL(blob);
    const link = el("a", { href, download: entry.name });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(href), 60_000);
    status.textContent = `downloaded ${entry.name} (${bytes(blob.size)})`;
  } catch (error) {
    status.textContent = "";
    failed(error, "download");
  }
}

async function onUpload() {
  const input = $("files-upload");
  const status = $("files-status");
  for (const file of input.files) {
    status.textContent = `uploading ${file.name}…`;
    try {
      const written = await api("PUT", filesUrl(joinPath(state.filesPath, file.name)), { body: file });
      status.textContent = `uploaded ${file.name} (${bytes(written.size)})`;
    } catch (error) {
      status.textContent = "";
      failed(error, "upload");
    }
  }
  input.value = "";
  const done = status.textContent;
  await listFiles(state.filesPath);
  if (done) status.textContent = done;
}

// --- exec log and audit log ------------------------------------------------------------

async function refreshExecs() {
  try {
    const log = await api("GET", `/v1/sandboxes/${enc(state.selected)}/execs`);
    const rows = log.entries
      .slice()
      .reverse()
      .map((entry) =>
        el(
          "tr",
          {},
          el("td", {}, when(entry.started_at)),
          el("td", { className: "mono" }, Array.isArray(entry.command) ? entry.command.join(" ") : entry.command),
          el("td", {}, entry.timed_out ? "timed out" : entry.exit_code ?? "—"),
          el("td", {}, `${Math.round(entry.duration_ms)} ms`),
        ),
      );
    $("execs").tBodies[0].replaceChildren(...rows);
    $("no-execs").hidden = rows.length > 0;
  } catch (error) {
    failed(error, "exec log");
  }
}

async function refreshAudit() {
  try {
    const log = await api("GET", "/v1/audit?limit=50");
    const rows = log.entries.map((entry) =>
      el(
        "tr",
        {},
        el("td", {}, when(entry.at)),
        el("td", {}, entry.tenant),
        el("td", {}, entry.action),
        el("td", { className: "mono" }, entry.target_id ?? ""),
        el("td", { className: entry.outcome === "ok" ? "" : "error" }, entry.outcome),
        el("td", { className: "mono" }, JSON.stringify(entry.detail)),
      ),
    );
    $("audit-log").tBodies[0].replaceChildren(...rows);
  } catch (error) {
    failed(error, "audit log");
  }
}

// --- wiring ----------------------------------------------------------------------------

function wire() {
  $("signin-form").addEventListener("submit", onSignIn);
  $("sign-out").addEventListener("click", () => signOut());
  $("create-form").addEventListener("submit", onCreate);
  $("refresh").addEventListener("click", refreshSandboxes);
  $("show-stopped").addEventListener("change", renderSandboxes);
  $("detail-close").addEventListener("click", closeDetail);
  $("action-kill").addEventListener("click", onKill);
  $("action-pause").addEventListener("click", () => act("pause", "POST", "/pause"));
  $("action-resume").addEventListener("click", () => act("resume", "POST", "/resume"));
  $("action-snapshot").addEventListener("click", onSnapshot);
  $("timeout-form").addEventListener("submit", onTimeout);
  for (const button of document.querySelectorAll(".tabs button")) {
    button.addEventListener("click", () => showTab(button.dataset.tab));
  }
  $("terminal-open").addEventListener("click", openTerminal);
  $("terminal-close").addEventListener("click", closeTerminal);
  $("files-form").addEventListener("submit", (event) => {
    event.preventDefault();
    listFiles($("files-path").value.trim() || "/");
  });
  $("files-up").addEventListener("click", () => listFiles(parentPath(state.filesPath)));
  $("files-upload").addEventListener("change", onUpload);
  $("execs-refresh").addEventListener("click", refreshExecs);
  $("audit-refresh").addEventListener("click", refreshAudit);
}

async function start() {
  wire();
  const key = storedKey();
  if (key === null) {
    $("signin-view").hidden = false;
    $("api-key").focus();
    return;
  }
  try {
    await signIn(key); // a reload of the tab: the key is checked again
  } catch (error) {
    signOut();
    failed(error, "sign-in");
  }
}

start();
