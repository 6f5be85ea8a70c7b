// dockercomp dashboard: subscribes to the retained status topics over MQTT on WebSockets and
// renders them. No build step, no framework: one file the browser runs as served. The broker's
// ACL decides what this page may see; the page itself keeps nothing (credentials live in memory).
"use strict";

(() => {
  // Seconds of tasks/s history the chart shows, sampled once a second.
  const CHART_SECONDS = 300;
  // The coordinator publishes the summary only when something changed, and its rate covers the
  // last 10 s: an older summary means nothing finished since, so the chart reads 0 (WHY: no
  // publication at all when idle, and a stale rate would stay on screen forever).
  const RATE_WINDOW = 10;
  // Seconds of per-job history behind a job's rate and ETA.
  const JOB_RATE_WINDOW = 30;
  // Events kept in the feed.
  const MAX_EVENTS = 200;
  // MQTT CONNACK return codes meaning "who are you?" (4: bad user name or password; 5: not authorized).
  const REFUSED = { 4: "wrong user name or password", 5: "not authorized" };

  const $ = (id) => document.getElementById(id);
  const state = {
    summary: null, summaryAt: 0, coordinator: null,
    jobs: new Map(), workers: new Map(), volunteers: new Map(),
    rates: [], jobSamples: new Map(), ignored: 0, connected: false, everConnected: false,
    sort: { key: "name", dir: 1 },
  };
  const probes = {}; // filter -> topics received (window.dashboard.probe, for tests and curious observers)
  let client = null;
  let config = { ws_url: null, root: "dockercomp" };
  let credentials = null; // {username, password} once the observer typed them
  let renderTimer = null;

  // ------------------------------------------------------------------ connection
  function brokerUrl() {
    const params = new URLSearchParams(location.search);
    if (params.get("broker")) return params.get("broker");
    if (config.ws_url) return config.ws_url;
    // The shipped mosquitto.conf's secure WebSockets listener, on the host that served this page.
    return `wss://${location.hostname}:${config.default_ws_port || 8884}/mqtt`;
  }

  function connect() {
    if (client) client.end(true);
    const url = brokerUrl();
    $("broker").textContent = url;
    const options = {
      protocolVersion: 4, clean: true, keepalive: 30, reconnectPeriod: 3000, connectTimeout: 10000,
      clientId: "dashboard-" + Array.from(crypto.getRandomValues(new Uint8Array(8)), (b) => b.toString(16).padStart(2, "0")).join(""),
    };
    if (credentials) Object.assign(options, credentials);
    setBadge("connecting…", "");
    client = mqtt.connect(url, options);
    client.on("connect", () => {
      state.connected = state.everConnected = true;
      hideMessage();
      $("login").hidden = true;
      setBadge(credentials ? `connected as ${credentials.username}` : "connected", "ok");
      // Retained messages arrive again on every connection: start from them, not from what we had.
      state.jobs.clear(); state.workers.clear(); state.volunteers.clear();
      state.summary = null; state.coordinator = null;
      client.subscribe([`${config.root}/status/#`, `${config.root}/coordinator/presence`], { qos: 1 });
      for (const filter of Object.keys(probes)) client.subscribe(filter, { qos: 1 });
      scheduleRender();
    });
    client.on("message", onMessage);
    client.on("error", (err) => {
      if (err && REFUSED[err.code]) {
        client.end(true); // retrying with the same account would only be refused again
        setBadge("refused", "bad");
        askCredentials(credentials
          ? `The broker refused the account “${credentials.username}”: ${REFUSED[err.code]}. Check the observer account.`
          : "The broker asks for an observer account.");
        if (credentials) showMessage(`Connection refused by ${url}: ${REFUSED[err.code]}.`, "bad");
        return;
      }
      showMessage(`Broker ${url}: ${err && err.message ? err.message : err}`, "bad");
    });
    client.on("close", () => {
      state.connected = false;
      if (!$("login").hidden) return;
      setBadge("disconnected — retrying", "bad");
      if (!state.everConnected) {
        showMessage(`Cannot reach the broker at ${url} (is its WebSockets listener on? ` +
          "`dockercomp broker serve --ws-port N`, or port 8884 of the shipped mosquitto.conf; and for wss://, does this browser trust its certificate?). Retrying…", "bad");
      }
    });
  }

  function askCredentials(why) {
    $("login-why").textContent = why;
    $("login").hidden = false;
    if (credentials) $("username").value = credentials.username;
    $("username").focus();
  }

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    credentials = { username: $("username").value.trim(), password: $("password").value };
    $("password").value = "";
    hideMessage();
    connect();
  });

  // ------------------------------------------------------------------ messages
  function topicMatches(filter, topic) {
    const f = filter.split("/"), t = topic.split("/");
    for (let i = 0; i < f.length; i++) {
      if (f[i] === "#") return true;
      if (i >= t.length || (f[i] !== "+" && f[i] !== t[i])) return false;
    }
    return f.length === t.length;
  }

  function onMessage(topic, payload, packet) {
    for (const filter of Object.keys(probes)) {
      if (topicMatches(filter, topic)) probes[filter].push(topic);
    }
    const live = !packet.retain; // a retained message is the state as we connect, not news
    const root = config.root + "/";
    if (!topic.startsWith(root)) return; // amqtt sends retained messages of others' subscriptions
    const parts = topic.slice(root.length).split("/");
    let data = null;
    if (payload.length) {
      try {
        data = JSON.parse(new TextDecoder().decode(payload));
        if (data === null || typeof data !== "object" || Array.isArray(data)) throw new Error("not an object");
      } catch (err) {
        state.ignored += 1;
        scheduleRender();
        return;
      }
    }
    const key = parts.slice(2).join("/");
    if (parts[0] === "coordinator" && parts[1] === "presence" && parts.length === 2) {
      onCoordinator(data, live);
    } else if (parts[0] === "status" && parts[1] === "summary" && parts.length === 2) {
      if (data) { state.summary = data; state.summaryAt = Date.now() / 1000; }
    } else if (parts[0] === "status" && parts[1] === "jobs" && parts.length === 3) {
      onJob(key, data, live);
    } else if (parts[0] === "status" && parts[1] === "workers" && parts.length === 4) {
      onWorker(key, data, live);
    } else if (parts[0] === "status" && parts[1] === "volunteers" && parts.length === 3) {
      if (data) state.volunteers.set(key, data); else state.volunteers.delete(key);
    } else {
      return;
    }
    scheduleRender();
  }

  function onCoordinator(data, live) {
    const before = state.coordinator && state.coordinator.state;
    state.coordinator = data;
    if (live && data && data.state !== before) {
      event(data.state === "online" ? "coordinator up" : `coordinator down (${data.reason || "offline"})`,
        data.state === "online" ? "ok" : "bad");
    }
  }

  function onJob(id, data, live) {
    const before = state.jobs.get(id);
    if (!data) { state.jobs.delete(id); return; }
    state.jobs.set(id, data);
    const finished = (data.done || 0) + (data.failed || 0) + (data.cancelled || 0);
    const samples = state.jobSamples.get(id) || [];
    samples.push([Date.now() / 1000, finished]);
    while (samples.length > 2 && samples[0][0] < Date.now() / 1000 - JOB_RATE_WINDOW) samples.shift();
    state.jobSamples.set(id, samples);
    if (!live) return;
    const name = `job ${id} (${data.name})`;
    if (!before) event(`${name} submitted: ${data.total} tasks`, "");
    else if (before.state !== data.state && data.state === "done") {
      event(`${name} done: ${data.done} done, ${data.failed} failed`, data.failed ? "bad" : "ok");
    } else if (before.state !== data.state) event(`${name} ${data.state}`, "");
  }

  function onWorker(key, data, live) {
    const before = state.workers.get(key);
    if (!data) {
      state.workers.delete(key);
      if (live && before) event(`worker ${key} purged`, "");
      return;
    }
    state.workers.set(key, data);
    if (!live || (before && before.state === data.state)) return;
    const what = { online: before ? "back online" : "joined", lost: "lost", offline: "left", purged: "purged" };
    event(`worker ${key} ${what[data.state] || data.state}` +
      (data.state === "online" ? ` (capacity ${data.capacity})` : ""), data.state === "lost" ? "bad" : (data.state === "online" ? "ok" : ""));
  }

  function event(text, kind) {
    const item = document.createElement("li");
    const time = document.createElement("time");
    time.textContent = new Date().toLocaleTimeString();
    item.append(time, " ", text);
    if (kind) item.className = kind;
    const list = $("events");
    list.prepend(item);
    while (list.children.length > MAX_EVENTS) list.lastChild.remove();
  }

  // ------------------------------------------------------------------ rendering
  function scheduleRender() {
    if (renderTimer === null) renderTimer = setTimeout(() => { renderTimer = null; render(); }, 100);
  }

  function currentRate() {
    if (!state.summary) return 0;
    return Date.now() / 1000 - state.summaryAt > RATE_WINDOW ? 0 : Number(state.summary.rate) || 0;
  }

  function render() {
    renderSummary();
    renderJobs();
    renderWorkers();
    renderVolunteers();
    $("ignored").textContent = state.ignored ? `${state.ignored} malformed status message(s) ignored.` : "";
  }

  function renderSummary() {
    const s = state.summary, c = state.coordinator;
    const coordinator = $("coordinator");
    if (c && c.state === "online") {
      coordinator.textContent = "up"; coordinator.className = "value ok";
      coordinator.title = `${c.host || "?"} pid ${c.pid || "?"}, version ${c.version || "?"}, since ${clock(c.started)}`;
    } else if (c) {
      coordinator.textContent = `down (${c.reason || "offline"})`; coordinator.className = "value bad";
    } else {
      coordinator.textContent = "unknown"; coordinator.className = "value";
    }
    const workers = (s && s.workers) || {};
    $("online").textContent = s ? workers.online : "–";
    $("lost").textContent = s ? workers.lost : "–";
    $("lost").className = "value" + (workers.lost ? " bad" : "");
    $("capacity").textContent = s ? s.capacity : "–";
    $("in-flight").textContent = s ? s.in_flight : "–";
    $("rate").textContent = s ? currentRate().toFixed(1) : "–";
  }

  function sampleRate() {
    state.rates.push(currentRate());
    if (state.rates.length > CHART_SECONDS) state.rates.shift();
    const max = Math.max(1, ...state.rates);
    const step = 300 / (CHART_SECONDS - 1);
    const offset = CHART_SECONDS - state.rates.length;
    $("rate-line").setAttribute("points", state.rates
      .map((r, i) => `${((offset + i) * step).toFixed(1)},${(48 - 46 * r / max).toFixed(1)}`).join(" "));
    $("rate-chart").setAttribute("data-max", max.toFixed(1));
    renderSummary();
  }

  function cell(row, text, className) {
    const td = row.insertCell();
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }

  function renderJobs() {
    const body = $("jobs").tBodies[0];
    body.replaceChildren();
    const ids = [...state.jobs.keys()].sort((a, b) => Number(b) - Number(a));
    $("no-jobs").hidden = ids.length > 0;
    for (const id of ids) {
      const j = state.jobs.get(id);
      const total = j.total || 0;
      const finished = (j.done || 0) + (j.failed || 0) + (j.cancelled || 0);
      const pct = total ? Math.floor(100 * finished / total) : 100;
      const row = body.insertRow();
      row.id = `job-${id}`;
      row.className = j.state;
      cell(row, id); cell(row, j.name); cell(row, j.function);
      const bar = document.createElement("progress");
      bar.max = total || 1; bar.value = total ? finished : 1;
      const td = cell(row, "", "progress-col");
      const label = document.createElement("span");
      label.className = "pct"; label.textContent = `${pct} %`;
      td.append(bar, " ", label);
      cell(row, j.done); cell(row, j.failed, j.failed ? "bad" : "");
      cell(row, (j.pending || 0) + (j.assigned || 0));
      const rate = jobRate(id);
      const left = total - finished;
      cell(row, j.state === "active" ? `${rate.toFixed(1)}/s` : "");
      cell(row, j.state !== "active" ? "" : (rate > 0 ? duration(left / rate) : "–"));
      cell(row, j.state, j.state === "done" ? "ok" : "");
    }
  }

  function jobRate(id) {
    const samples = state.jobSamples.get(id) || [];
    if (samples.length < 2) return 0;
    const [t0, n0] = samples[0], [t1, n1] = samples[samples.length - 1];
    // Measured up to now, not to the last sample: a job whose status stopped changing slows down.
    const span = Math.max(Date.now() / 1000 - t0, t1 - t0, 1);
    return (n1 - n0) / span;
  }

  function renderWorkers() {
    const body = $("workers").tBodies[0];
    body.replaceChildren();
    const { key, dir } = state.sort;
    const rows = [...state.workers.entries()].map(([name, w]) => ({ ...w, name }));
    rows.sort((a, b) => {
      const x = a[key], y = b[key];
      const order = typeof x === "number" && typeof y === "number" ? x - y : String(x ?? "").localeCompare(String(y ?? ""));
      return dir * order || a.name.localeCompare(b.name);
    });
    $("no-workers").hidden = rows.length > 0;
    for (const w of rows) {
      const row = body.insertRow();
      row.id = `worker-${w.name}`;
      row.className = w.state;
      cell(row, w.name); cell(row, w.state, "state");
      cell(row, w.capacity); cell(row, w.in_flight); cell(row, w.done); cell(row, w.failed, w.failed ? "bad" : "");
      cell(row, w.state === "lost" && w.lost_at ? `lost ${ago(w.lost_at)}` : ago(w.last_seen));
    }
    for (const th of $("workers").tHead.rows[0].cells) {
      th.setAttribute("aria-sort", th.dataset.key === key ? (dir > 0 ? "ascending" : "descending") : "none");
    }
  }

  function renderVolunteers() {
    const body = $("volunteers").tBodies[0];
    body.replaceChildren();
    $("volunteers-section").hidden = state.volunteers.size === 0;
    const rows = [...state.volunteers.entries()].sort((a, b) => (b[1].credit || 0) - (a[1].credit || 0));
    for (const [name, v] of rows) {
      const row = body.insertRow();
      cell(row, name); cell(row, Number(v.credit || 0).toFixed(1));
      cell(row, v.validated ?? ""); cell(row, v.invalid ?? "", v.invalid ? "bad" : "");
      cell(row, v.trusted ? "yes" : "no");
      cell(row, v.quarantined ? (typeof v.quarantined === "number" ? `until ${clock(v.quarantined)}` : String(v.quarantined)) : "",
        v.quarantined ? "bad" : "");
    }
  }

  $("workers").tHead.addEventListener("click", (event) => {
    const th = event.target.closest("th[data-key]");
    if (!th) return;
    const key = th.dataset.key;
    state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : 1 };
    renderWorkers();
  });

  // ------------------------------------------------------------------ formatting
  function ago(seconds) {
    if (!seconds) return "";
    const d = Math.max(0, Date.now() / 1000 - seconds);
    return d < 1 ? "just now" : `${duration(d)} ago`;
  }

  function duration(seconds) {
    if (!isFinite(seconds)) return "–";
    const s = Math.round(seconds);
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }

  function clock(seconds) {
    return seconds ? new Date(seconds * 1000).toLocaleTimeString() : "?";
  }

  function setBadge(text, kind) {
    $("connection").textContent = text;
    $("connection").className = "badge " + kind;
  }

  function showMessage(text, kind) {
    $("message").textContent = text;
    $("message").className = "message " + kind;
    $("message").hidden = false;
  }

  function hideMessage() { $("message").hidden = true; }

  // ------------------------------------------------------------------ start
  window.dashboard = {
    state,
    // Subscribes this page's connection to `filter` and records the topics that arrive on it;
    // resolves to the granted QoS list (the ACL may still deliver nothing: Mosquitto grants
    // every SUBSCRIBE and checks each message).
    probe(filter) {
      probes[filter] = [];
      return new Promise((resolve) => client.subscribe(filter, { qos: 1 },
        (err, granted) => resolve(err ? String(err) : granted.map((g) => g.qos))));
    },
    probes,
  };

  fetch("config.json", { cache: "no-store" })
    .then((response) => response.json())
    .then((loaded) => { config = Object.assign(config, loaded); })
    .catch(() => showMessage("config.json could not be read: connecting with the defaults.", "bad"))
    .finally(() => {
      $("root").textContent = `${config.root}/status/#`;
      $("chart-span").textContent = String(CHART_SECONDS / 60);
      setInterval(sampleRate, 1000);
      setInterval(() => { renderJobs(); renderWorkers(); }, 5000); // ages and ETAs move without messages
      connect();
    });
})();
