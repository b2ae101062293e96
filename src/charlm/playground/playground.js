// The playground page: talks to charlm serve's API (/api/runs, /api/generate, /api/attention), or, in a page that
// `charlm export --web` wrote, to the model in this tab (model.js) that answers the same; no libraries.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  runs: [],        // GET /api/runs
  run: null,       // the picked run's name
  tokens: [],      // {id, text, prompt, p, top} for every token shown, prompt first
  controller: null,  // aborts the generation in flight
  picked: null,    // index of the clicked token
  attention: null, // the last /api/attention answer, for the picked token
  roles: null,     // the last /api/heads answer, for the text shown
  layer: 0, head: "mean",
};

// charlm serve's answers, over HTTP
const server = {
  async runs() {
    return fetch("/api/runs").then((r) => r.json());
  },

  // the stream of server-sent events, each handed to onEvent(kind, data) as it comes
  async generate(body, onEvent, signal) {
    let response;
    try {
      response = await fetch("/api/generate", {
        method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body), signal,
      });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new Error(`the server did not answer (${error.message}): is charlm serve still running?`);
    }
    if (!response.ok) {
      const answer = await response.json().catch(() => ({error: response.statusText}));
      onEvent("error", answer);
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const kind = block.match(/^event: (.*)$/m)[1];
        onEvent(kind, JSON.parse(block.match(/^data: (.*)$/m)[1]));
      }
    }
  },

  // a look at a text: {ok, answer} of POST /api/attention, /api/lens, /api/surprise or /api/heads
  async post(path, body) {
    const response = await fetch(path, {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
    });
    return {ok: response.ok, answer: await response.json()};
  },
  attention(body) { return this.post("/api/attention", body); },
  lens(body) { return this.post("/api/lens", body); },
  surprise(body) { return this.post("/api/surprise", body); },
  heads(body) { return this.post("/api/heads", body); },
};
const api = window.charlmInTab ?? Promise.resolve(server);

function runOf(name) { return state.runs.find((r) => r.name === name); }

function describe(run) {
  if (run.error) return `${run.name}: cannot be read`;
  const parts = [run.name];
  if (run.step !== null) parts.push(`step ${run.step}`);
  if (run.val_loss !== null) parts.push(`val ${run.val_loss.toFixed(4)}`);
  const size = run.parameters < 1e5 ? `${run.parameters.toLocaleString("en")} parameters`
    : `${(run.parameters / 1e6).toFixed(2)}M`;  // a bigram's 4,225 is no "0.00M"
  parts.push(`${run.net}, ${run.tokenizer} (${run.vocab_size})`, size);
  return parts.join(" · ");
}

async function loadRuns() {
  const answer = await (await api).runs();
  state.runs = answer.runs;
  $("device").textContent = `on ${answer.device}`;
  offer(answer.settings);
  const select = $("run");
  select.replaceChildren(...state.runs.map((run) => {
    const option = new Option(describe(run), run.name);
    option.disabled = Boolean(run.error);
    option.title = run.error || "";
    return option;
  }));
  const keep = runOf(state.run) && !runOf(state.run).error ? state.run : state.runs.find((r) => r.served).name;
  select.value = keep;
  pickRun(keep);
}

// the generation settings, their defaults and bounds are the server's (charlm.settings.Sampling): a number setting
// the page has no field for yet gets a plain one
const offered = [];

function offer(settings) {
  if (settings.prompt.max !== null) $("prompt").maxLength = settings.prompt.max;
  for (const [name, {default: value, min, max, above}] of Object.entries(settings)) {
    if (name === "prompt" || name === "unknown" || offered.includes(name)) continue;  // kept: what the user typed
    const input = $(name) ?? field(name);
    offered.push(name);
    if (value !== null) input.value = value;
    if (min !== null && !above) input.min = min;
    if (max !== null) input.max = max;
  }
  $("temperature-range").value = $("temperature").value;
}

function field(name) {
  const input = Object.assign(document.createElement("input"), {id: name, type: "number", step: "any"});
  const label = document.createElement("label");
  label.append(`${name.replaceAll("_", " ")} `, input);
  document.querySelector("#compose .buttons").before(label);
  return input;
}

function pickRun(name) {
  if (name === state.run) return;
  stop();
  state.run = name;
  clearOutput();
  const attention = runOf(name).attention;
  $("attention-note").hidden = $("attention-pick").hidden = !attention;
  $("no-attention").hidden = attention;
  api.then((client) => {  // the model in an exported page's tab answers generate and attention only
    $("lens-note").hidden = $("off-controls").hidden = !attention || !client.lens;
    $("read").hidden = !client.surprise;
  });
}

function setState(value) {
  $("output").dataset.state = value;
  $("generate").disabled = $("read").disabled = value === "streaming";
  $("stop").disabled = value !== "streaming";
}

function clearOutput() {
  pending.replaceChildren();
  state.tokens = [];
  state.picked = null;
  state.attention = null;
  state.roles = null;
  state.drawn = null;
  $("output").replaceChildren();
  for (const id of ["candidates", "heads", "lens", "cut"]) $(id).replaceChildren();
  $("picked").textContent = "Click a character";
  $("ablation").textContent = "";
  $("beside-box").hidden = true;
  say("");
}

function say(text, error = true) {
  $("status").textContent = text;
  $("status").className = error ? "" : "info";
}

function numberOrNull(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

function settings() {
  return {
    run: state.run,
    prompt: $("prompt").value,
    ...Object.fromEntries(offered.map((name) => [name, numberOrNull(name)])),  // null: the server's default
  };
}

function addToken(token) {
  const i = state.tokens.push(token) - 1;
  const span = document.createElement("span");
  span.className = "tok" + (token.prompt ? " prompt" : " gen") + (token.text === "\n" ? " nl" : "");
  span.dataset.i = i;
  span.textContent = token.text;
  const tint = token.read ? Math.min(1, token.bits / 8) : token.prompt ? 0 : (1 - token.p) ** 1.5;
  if (tint) span.style.backgroundColor = `rgba(var(--warm), ${(0.6 * tint).toFixed(3)})`;
  span.title = token.prompt ? "prompt" : token.read ? `${token.bits.toFixed(2)} bits` : `p = ${token.p}`;
  token.span = span;
  pending.append(span);
  if (!drawing) drawing = requestAnimationFrame(flush);
}

// tokens can arrive faster than the screen refreshes: they are added to the page once a frame, in one go
const pending = document.createDocumentFragment();
let drawing = 0;

function flush() {
  cancelAnimationFrame(drawing);
  drawing = 0;
  const output = $("output");
  const follow = output.scrollTop + output.clientHeight >= output.scrollHeight - 4;
  output.append(pending);
  if (follow) output.scrollTop = output.scrollHeight;
}

function onEvent(kind, data) {
  if (kind === "start") {
    data.ids.forEach((id, i) => addToken({id, text: data.labels[i], prompt: true}));
  } else if (kind === "token") {
    addToken({id: data.id, text: data.text, label: data.label, prompt: false, p: data.p, top: data.top});
  } else if (kind === "end") {
    if (data.text) {  // the last bytes of an unfinished character
      state.tokens.at(-1).text += data.text;
      state.tokens.at(-1).span.textContent += data.text;
    }
    flush();
    say(`done: ${data.tokens} characters in ${data.seconds} s`, false);
    setState("done");
  } else if (kind === "error") {
    flush();
    say(data.error);
    setState("error");
  }
}

async function generate() {
  stop();
  clearOutput();
  const controller = new AbortController();
  state.controller = controller;
  setState("streaming");
  try {
    state.drawn = settings();  // what the text was drawn with, for the cut of a clicked character
    await (await api).generate(state.drawn, onEvent, controller.signal);
    if ($("output").dataset.state === "streaming" && state.controller === controller) {
      flush();
      setState("done");
    }
  } catch (error) {
    if (error.name !== "AbortError") {
      say(error.message);
      setState("error");
    }
  } finally {
    if (state.controller === controller) state.controller = null;
  }
}

function stop() {
  if (!state.controller) return;
  state.controller.abort();
  state.controller = null;
  flush();
  setState("stopped");
}

function showCandidates(token) {
  const box = $("candidates");
  if (token.prompt || (token.read && !token.top)) {
    const text = token.prompt ? "Part of the prompt: typed, not drawn."
      : `Read, not drawn: ${token.bits.toFixed(2)} bits.`;
    box.replaceChildren(Object.assign(document.createElement("p"), {className: "muted", textContent: text}));
    return;
  }
  const rows = token.top.map(([label, p]) => {
    const row = document.createElement("div");
    row.className = "row" + (label === token.label ? " drawn" : "");
    const char = Object.assign(document.createElement("span"), {className: "char", textContent: visible(label)});
    const bar = Object.assign(document.createElement("span"), {className: "bar"});
    bar.style.width = `${(100 * p).toFixed(1)}%`;
    const value = Object.assign(document.createElement("span"), {className: "p", textContent: percent(p)});
    row.append(char, bar, value);
    return row;
  });
  const how = token.read ? "Read, where the model gave it probability"
    : state.drawn?.temperature === 0 ? "Greedy (temperature 0): the most likely, with probability"
    : "Drawn with probability";
  const note = Object.assign(document.createElement("p"), {
    className: "muted", textContent: `${how} ${percent(token.p)} from these candidates:`,
  });
  box.replaceChildren(note, ...rows);
}

function visible(text) {
  return {"\n": "\u21b5", " ": "\u2423", "\t": "\u21e5"}[text] ?? text;
}

function percent(p) {
  return p >= 0.001 ? `${(100 * p).toFixed(1)}%` : `${(100 * p).toPrecision(1)}%`;
}

async function pick(i) {
  document.querySelectorAll(".tok.picked").forEach((el) => el.classList.remove("picked"));
  state.tokens[i].span.classList.add("picked");
  state.picked = i;
  const token = state.tokens[i];
  $("picked").textContent = `Character ${i + 1}: "${visible(token.text)}"`;
  showCandidates(token);
  if (matchMedia("(max-width: 800px)").matches) $("inspect").scrollIntoView({block: "start"});  // a phone: below
  $("lens").replaceChildren();
  $("cut").replaceChildren();
  if (!runOf(state.run).attention) return;
  const client = await api;
  const ids = state.tokens.slice(0, i + 1).map((t) => t.id);
  const looks = [showAttention(client, i, ids), showRoles(client)];
  if (client.lens && i >= 1) looks.push(showLens(client, i, ids));
  await Promise.all(looks);
}

async function showAttention(client, i, ids) {
  const {ok, answer} = await client.attention({run: state.run, ids});
  if (state.picked !== i) return;  // another character was clicked meanwhile
  if (!ok) {
    say(answer.error);
    return;
  }
  state.attention = answer;
  fillHeadPickers(answer.weights.length, answer.weights[0].length);
  drawAttention();
}

// the lens: a row per depth, its five most likely characters, and where the one that came ranks
async function showLens(client, i, ids) {
  const {ok, answer} = await client.lens({run: state.run, ids, pos: i - 1});
  if (state.picked !== i) return;
  if (!ok) {
    say(answer.error);
    return;
  }
  const token = state.tokens[i];
  const last = answer.rows.at(-1);
  if (token.read) showCandidates({...token, top: last.top, p: last.p, label: token.text});
  if (!token.read && !token.prompt) showCut(token, last.top);
  $("lens").replaceChildren(...answer.rows.map((row, depth) => {
    const line = Object.assign(document.createElement("div"), {className: "row"});
    const chips = Object.assign(document.createElement("span"), {className: "chips"});
    chips.append(...row.top.slice(0, 5).map(([label, p]) => {
      const chip = Object.assign(document.createElement("span"), {
        className: "chip" + (label === token.text ? " came" : ""), textContent: visible(label),
        title: percent(p),
      });
      chip.style.setProperty("--p", Math.min(0.8, p).toFixed(3));
      return chip;
    }));
    const where = Object.assign(document.createElement("span"), {
      className: "where", textContent: ` came: #${row.rank}, ${percent(row.p)}`,
    });
    chips.append(where);
    line.append(answer.depths[depth], chips);
    return line;
  }));
}

// the cut of sampling: the model's own ten most likely characters (temperature 1, nothing cut), beside what the
// character was drawn from after the temperature, top-k and top-p; a candidate they cut is greyed
function showCut(token, own) {
  const after = new Map(token.top);
  const {temperature, top_k: k, top_p: p} = state.drawn;
  const how = [`temperature ${temperature ?? "default"}`, k ? `top-k ${k}` : "", p ? `top-p ${p}` : ""];
  const note = Object.assign(document.createElement("p"), {
    className: "muted",
    textContent: `The cut of sampling: the model's own probabilities, then after ${how.filter(Boolean).join(", ")}:`,
  });
  const rows = own.map(([label, before]) => {
    const row = document.createElement("div");
    const kept = after.get(label);
    row.className = "row" + (kept ? "" : " cut") + (label === token.label ? " drawn" : "");
    row.append(...[visible(label), percent(before), kept ? percent(kept) : "cut"].map((text, j) =>
      Object.assign(document.createElement("span"), {className: ["char", "p", "p"][j], textContent: text})));
    return row;
  });
  $("cut").replaceChildren(note, ...rows);
}

// what each head does over the text shown, measured by the server (/api/heads), asked once per text
async function showRoles(client) {
  if (!client.heads || state.roles?.characters === state.tokens.length) return;
  const {ok, answer} = await client.heads({run: state.run, ids: state.tokens.map((t) => t.id)});
  if (ok) {
    state.roles = answer;
    drawAttention();
  }
}

function roleOf(layer, head) {
  const found = state.roles?.heads[layer]?.[head];
  return found ? `${found.role.replace("start of the ", "").split(" ")[0]} ${found.score.toFixed(2)}` : "";
}

// the text shown, read again with the chosen head (or layer's attention) switched off: which characters got harder
function chosenPart() {
  const off = state.head === "mean" ? {off_attention: [state.layer]} : {off_heads: [[state.layer, state.head]]};
  const layer = `layer ${state.layer + 1}`;
  return {off, which: state.head === "mean" ? `${layer}'s attention` : `${layer}, head ${state.head + 1}`};
}

async function switchOff() {
  if (state.tokens.length < 2 || !state.attention) return;
  const {off, which} = chosenPart();
  const {ok, answer} = await (await api).surprise({run: state.run, ids: state.tokens.map((t) => t.id), ...off});
  if (!ok) {
    say(answer.error);
    return;
  }
  answer.bits.forEach((bits, j) => {
    const span = state.tokens[j + 1].span, change = bits - answer.base_bits[j];
    span.classList.remove("harder", "easier");
    span.classList.add(change > 0 ? "harder" : "easier");
    span.style.setProperty("--d", Math.min(1, Math.abs(change) / 2).toFixed(3));
    span.title = `${answer.base_bits[j].toFixed(2)} -> ${bits.toFixed(2)} bits with ${which} off`;
  });
  const change = answer.mean_bits - answer.mean_base_bits;
  $("ablation").textContent = `${which} off: ${change >= 0 ? "+" : ""}${change.toFixed(3)} bits per character ` +
    `(${answer.mean_base_bits.toFixed(3)} -> ${answer.mean_bits.toFixed(3)}); red underlines: harder, green: easier.`;
}

// the last generation again, the same settings and seed, with the chosen part switched off: its text below
async function generateOff() {
  if (!state.drawn || !state.attention) return;
  const {off, which} = chosenPart();
  const box = $("beside");
  box.replaceChildren();
  $("beside-title").textContent = `The same settings and seed with ${which} off:`;
  $("beside-box").hidden = false;
  await (await api).generate({...state.drawn, ...off}, (kind, data) => {
    if (kind === "error") say(data.error);
    else box.append(kind === "start" ? data.prompt : data.text ?? "");
  }, new AbortController().signal);
}

// the text in the box, tinted by the model's surprise at each character (/api/surprise): what validate measures
async function read() {
  stop();
  clearOutput();
  const {ok, answer} = await (await api).surprise({run: state.run, text: $("prompt").value || "\n"});
  if (!ok) {
    say(answer.error);
    setState("error");
    return;
  }
  answer.ids.forEach((id, j) => addToken(j === 0 ? {id, text: answer.labels[0], prompt: true}
    : {id, text: answer.labels[j], read: true, bits: answer.bits[j - 1]}));
  flush();
  say(`${answer.mean_bits.toFixed(4)} bits per character over the ${answer.bits.length} characters after the first`,
    false);
  setState("done");
}

// attention as a directed graph: an edge from the clicked character to each one it attends to, as heavy as the weight
function drawEdges(spans, first, weights) {
  const output = $("output");
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.id = "edges";
  svg.setAttribute("width", output.scrollWidth);
  svg.setAttribute("height", output.scrollHeight);
  const to = spans[first + weights.length - 1];
  const centre = (span) => [span.offsetLeft + span.offsetWidth / 2, span.offsetTop + 2];
  const [x1, y1] = centre(to);
  weights.forEach((w, j) => {
    if (w < 0.02 || first + j === state.picked) return;
    const [x0, y0] = centre(spans[first + j]);
    const lift = 12 + Math.min(60, Math.abs(x1 - x0) / 4);
    const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
    path.setAttribute("d", `M ${x1} ${y1} Q ${(x0 + x1) / 2} ${Math.min(y0, y1) - lift} ${x0} ${y0}`);
    path.setAttribute("stroke-width", (1 + 4 * w).toFixed(2));
    path.setAttribute("stroke-opacity", Math.min(1, 0.3 + 1.5 * w).toFixed(3));
    svg.append(path);
  });
  $("edges")?.remove();
  output.append(svg);
}

function fillHeadPickers(layers, heads) {
  const layer = $("layer"), head = $("head");
  if (layer.options.length !== layers) {
    layer.replaceChildren(...Array.from({length: layers}, (_, l) => new Option(String(l + 1), l)));
    state.layer = layers - 1;
  }
  if (head.options.length !== heads + 1) {
    const each = Array.from({length: heads}, (_, h) => new Option(String(h + 1), h));
    head.replaceChildren(new Option("mean of all", "mean"), ...each);
    state.head = "mean";
  }
  layer.value = state.layer;
  head.value = state.head;
}

function chosenWeights() {
  const rows = state.attention.weights[state.layer];
  if (state.head !== "mean") return rows[state.head];
  return rows[0].map((_, j) => rows.reduce((sum, row) => sum + row[j], 0) / rows.length);
}

function drawAttention() {
  const answer = state.attention;
  document.querySelectorAll(".tok").forEach((el) => { el.style.boxShadow = ""; });
  $("edges")?.remove();
  if (!answer) return;
  const spans = state.tokens.map((token) => token.span);
  const weights = chosenWeights();
  weights.forEach((w, j) => {
    const span = spans[answer.first + j];
    if (span) span.style.boxShadow = `inset 0 -0.45em 0 rgba(var(--attend), ${Math.min(1, w).toFixed(3)})`;
  });
  drawEdges(spans, answer.first, weights);
  const heads = $("heads");
  const n = answer.weights[0].length;
  heads.style.gridTemplateColumns = `repeat(${n}, minmax(0, 1fr))`;
  const figures = [];
  answer.weights.forEach((rows, l) => rows.forEach((row, h) => {
    const figure = document.createElement("figure");
    figure.className = l === state.layer && h === state.head ? "chosen" : "";
    figure.title = `layer ${l + 1}, head ${h + 1} ${roleOf(l, h)}: click to draw it under the text`;
    const canvas = document.createElement("canvas");
    canvas.width = row.length;
    canvas.height = 1;
    const context = canvas.getContext("2d");
    const attend = getComputedStyle(document.documentElement).getPropertyValue("--attend");
    row.forEach((w, j) => {
      context.fillStyle = `rgba(${attend}, ${Math.min(1, w)})`;
      context.fillRect(j, 0, 1, 1);
    });
    const caption = Object.assign(document.createElement("figcaption"), {textContent: `L${l + 1} H${h + 1}`});
    const role = Object.assign(document.createElement("span"), {className: "role", textContent: roleOf(l, h)});
    caption.append(role);
    figure.append(caption, canvas);
    figure.addEventListener("click", () => {
      state.layer = l;
      state.head = h;
      fillHeadPickers(answer.weights.length, n);
      drawAttention();
    });
    figures.push(figure);
  }));
  heads.replaceChildren(...figures);
}

$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", stop);
$("read").addEventListener("click", read);
$("switch-off").addEventListener("click", switchOff);
$("generate-off").addEventListener("click", generateOff);
$("run").addEventListener("change", (event) => pickRun(event.target.value));
$("run").addEventListener("focus", loadRuns);  // runs trained since the page opened appear
$("output").addEventListener("click", (event) => {
  const span = event.target.closest(".tok");
  if (span) pick(Number(span.dataset.i));
});
$("layer").addEventListener("change", (event) => { state.layer = Number(event.target.value); drawAttention(); });
$("head").addEventListener("change", (event) => {
  state.head = event.target.value === "mean" ? "mean" : Number(event.target.value);
  drawAttention();
});
$("temperature-range").addEventListener("input", (event) => { $("temperature").value = event.target.value; });
$("temperature").addEventListener("input", (event) => { $("temperature-range").value = event.target.value; });
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) generate();
});
loadRuns().catch((error) => { $("status").textContent = `cannot list the runs: ${error.message}`; });
