// The model in this browser tab, for the page that `charlm export --web` writes: charlm's GPT and bigram computed
// as charlm.models computes them (float32 weights read from model.safetensors), the sampling loop of
// charlm.sampling, and the answers that playground.js asks charlm serve for (runs, generate, attention).
"use strict";

// safetensors: 8 bytes of header length, a JSON header, then each tensor's little-endian bytes
function readSafetensors(buffer) {
  const length = Number(new DataView(buffer).getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 8, length)));
  const tensors = {};
  for (const [name, info] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    if (info.dtype !== "F32") throw new Error(`model.safetensors: ${name} is ${info.dtype}, not F32`);
    const [begin, end] = info.data_offsets;
    tensors[name] = new Float32Array(buffer.slice(8 + length + begin, 8 + length + end));
  }
  return tensors;
}

// erf to about 1e-15 (W. J. Cody's rational approximations are longer; this series and continued fraction are
// exact enough for float32): GELU is nn.GELU's exact form, x * (1 + erf(x / sqrt 2)) / 2
function erf(x) {
  const a = Math.abs(x);
  let result;
  if (a < 2.5) {  // the Taylor series: converges fast here
    let term = a, sum = a;
    for (let n = 1; n < 60; n++) {
      term *= -a * a / n;
      sum += term / (2 * n + 1);
    }
    result = 2 / Math.sqrt(Math.PI) * sum;
  } else {  // the continued fraction of erfc
    let fraction = 0;
    for (let n = 60; n >= 1; n--) fraction = n / 2 / (a + fraction);
    result = 1 - Math.exp(-a * a) / Math.sqrt(Math.PI) / (a + fraction);
  }
  return x < 0 ? -result : result;
}

function gelu(x) { return 0.5 * x * (1 + erf(x / Math.SQRT2)); }

// y = W x + b for W (rows, cols) in row-major order
function linear(x, weight, bias, rows) {
  const cols = x.length, y = new Float32Array(rows);
  for (let r = 0; r < rows; r++) {
    let sum = bias ? bias[r] : 0;
    const offset = r * cols;
    for (let c = 0; c < cols; c++) sum += weight[offset + c] * x[c];
    y[r] = sum;
  }
  return y;
}

function layerNorm(x, weight, bias) {
  const n = x.length;
  let mean = 0, variance = 0;
  for (let i = 0; i < n; i++) mean += x[i];
  mean /= n;
  for (let i = 0; i < n; i++) variance += (x[i] - mean) ** 2;
  const scale = 1 / Math.sqrt(variance / n + 1e-5);
  const y = new Float32Array(n);
  for (let i = 0; i < n; i++) y[i] = (x[i] - mean) * scale * weight[i] + (bias ? bias[i] : 0);
  return y;
}

// nn.RMSNorm over x[offset .. offset + n): x / sqrt(mean(x^2) + eps) * weight, eps float32's machine epsilon
function rmsNorm(x, offset, n, weight) {
  let square = 0;
  for (let i = 0; i < n; i++) square += x[offset + i] ** 2;
  const scale = 1 / Math.sqrt(square / n + 1.1920928955078125e-7);
  for (let i = 0; i < n; i++) x[offset + i] *= scale * weight[i];
}

class GPT {
  constructor(args, w) {
    // vocab_size, block_size, n_layer, n_head, n_embd, bias, pos_emb, and the options an older export lacks
    Object.assign(this, {qk_norm: false, mlp: "gelu", logit_cap: 0, value_embeds: false}, args);
    this.w = w;
    this.hs = this.n_embd / this.n_head;
    if (this.pos_emb === "rope") {  // angle of channel pair i at position t: t / 10000^(2i / head size)
      const half = this.hs / 2;
      this.cos = new Float32Array(this.block_size * half);
      this.sin = new Float32Array(this.block_size * half);
      for (let t = 0; t < this.block_size; t++) {
        for (let i = 0; i < half; i++) {
          const angle = Math.fround(t * Math.fround(10000 ** -((2 * i) / this.hs)));
          this.cos[t * half + i] = Math.cos(angle);
          this.sin[t * half + i] = Math.sin(angle);
        }
      }
    }
    this.clear();
  }

  clear() {  // the key/value cache: every layer's keys and values of positions 0 .. block_size - 1
    const size = this.block_size * this.n_embd;
    this.cache = Array.from({length: this.n_layer}, () => ({k: new Float32Array(size), v: new Float32Array(size)}));
  }

  rotate(x, offset, pos) {  // channel pairs (i, i + half) of one head turn by the position's angles
    const half = this.hs / 2;
    for (let i = 0; i < half; i++) {
      const c = this.cos[pos * half + i], s = this.sin[pos * half + i];
      const a = x[offset + i], b = x[offset + i + half];
      x[offset + i] = a * c - b * s;
      x[offset + i + half] = b * c + a * s;
    }
  }

  // the logits after the token `id` at position `pos`, the positions before it being in the cache; with `keep`,
  // also each layer's attention weights (n_layer x n_head x pos + 1) of this position
  step(id, pos, keep = false) {
    const {n_embd: C, n_head: nh, hs, w} = this;
    let x = w["wte.weight"].slice(id * C, (id + 1) * C);
    if (this.pos_emb === "learned") for (let c = 0; c < C; c++) x[c] += w["wpe.weight"][pos * C + c];
    const kept = [];
    for (let l = 0; l < this.n_layer; l++) {
      const p = `h.${l}.`, cache = this.cache[l];
      const qkv = linear(layerNorm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"]), w[p + "attn.c_attn.weight"],
        w[p + "attn.c_attn.bias"], 3 * C);
      if (this.qk_norm) for (let h = 0; h < 2 * nh; h++) rmsNorm(qkv, h * hs, hs, w[p + "attn.qk_norm.weight"]);
      if (this.pos_emb === "rope") for (let h = 0; h < 2 * nh; h++) this.rotate(qkv, h * hs, pos);
      if (this.value_embeds) for (let c = 0; c < C; c++) qkv[2 * C + c] += w[`vte.${l}.weight`][id * C + c];
      cache.k.set(qkv.subarray(C, 2 * C), pos * C);
      cache.v.set(qkv.subarray(2 * C, 3 * C), pos * C);
      const y = new Float32Array(C), heads = [];
      for (let h = 0; h < nh; h++) {
        const scores = new Float64Array(pos + 1);
        let max = -Infinity;
        for (let s = 0; s <= pos; s++) {
          let dot = 0;
          for (let i = 0; i < hs; i++) dot += qkv[h * hs + i] * cache.k[s * C + h * hs + i];
          scores[s] = dot / Math.sqrt(hs);
          max = Math.max(max, scores[s]);
        }
        let total = 0;
        for (let s = 0; s <= pos; s++) total += (scores[s] = Math.exp(scores[s] - max));
        for (let s = 0; s <= pos; s++) {
          const weight = scores[s] / total;
          scores[s] = weight;
          for (let i = 0; i < hs; i++) y[h * hs + i] += weight * cache.v[s * C + h * hs + i];
        }
        if (keep) heads.push(Array.from(scores));
      }
      if (keep) kept.push(heads);
      const attended = linear(y, w[p + "attn.c_proj.weight"], w[p + "attn.c_proj.bias"], C);
      for (let c = 0; c < C; c++) x[c] += attended[c];
      const hidden = linear(layerNorm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"]), w[p + "mlp.c_fc.weight"],
        w[p + "mlp.c_fc.bias"], 4 * C);
      const activation = this.mlp === "relu2" ? (v => Math.max(v, 0) ** 2) : gelu;
      for (let i = 0; i < hidden.length; i++) hidden[i] = activation(hidden[i]);
      const out = linear(hidden, w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"], C);
      for (let c = 0; c < C; c++) x[c] += out[c];
    }
    const logits = linear(layerNorm(x, w["ln_f.weight"], w["ln_f.bias"]), w["lm_head.weight"], null, this.vocab_size);
    const cap = this.logit_cap;
    if (cap) for (let i = 0; i < logits.length; i++) logits[i] = cap * Math.tanh(logits[i] / cap);
    return keep ? {logits, weights: kept} : logits;
  }

  // the logits after the last of `ids`, from a cache filled with them from position 0
  forward(ids, keep = false) {
    let out;
    ids.forEach((id, pos) => { out = this.step(id, pos, keep && pos === ids.length - 1); });
    return out;
  }
}

class Bigram {
  constructor(args, w) {
    Object.assign(this, args);
    this.block_size = 1;
    this.table = w["table.weight"];
  }

  forward(ids) {
    const id = ids.at(-1);
    return this.table.slice(id * this.vocab_size, (id + 1) * this.vocab_size);
  }
}

function softmax(logits) {
  let max = -Infinity, total = 0;
  for (const v of logits) max = Math.max(max, v);
  const probs = new Float64Array(logits.length);
  for (let i = 0; i < logits.length; i++) total += (probs[i] = Math.exp(logits[i] - max));
  for (let i = 0; i < probs.length; i++) probs[i] /= total;
  return probs;
}

// charlm.sampling.distribution: temperature, then top-k, then top-p over what is left
function distribution(logits, temperature, topK, topP) {
  let max = -Infinity;
  for (const v of logits) max = Math.max(max, v);
  const t = Math.max(temperature, 1.1754943508222875e-38);
  const scaled = Array.from(logits, (v) => (v - max) / t);
  if (topK !== null) {
    const kth = [...scaled].sort((a, b) => b - a)[Math.min(topK, scaled.length) - 1];
    scaled.forEach((v, i) => { if (v < kth) scaled[i] = -Infinity; });
  }
  if (topP !== null) {
    const probs = softmax(scaled);
    const order = [...probs.keys()].sort((a, b) => probs[b] - probs[a]);
    let before = 0;
    order.forEach((i, rank) => {
      if (rank > 0 && before >= topP) scaled[i] = -Infinity;  // the more likely already reach p
      before += probs[i];
    });
  }
  return softmax(scaled);
}

// a seeded generator for the draws (mulberry32): the same seed, the same text in this page; not torch's
function generator(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function draw(probs, random) {
  let u = random(), last = 0;
  for (let i = 0; i < probs.length; i++) {
    if (probs[i] > 0) last = i;
    if ((u -= probs[i]) < 0) return i;
  }
  return last;  // the rounding of the sum left u above 0
}

function argmax(values) {
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  return best;
}

function round4(v) { return Number(v.toPrecision(4)); }

class Tokenizer {
  constructor(state) {
    this.bytes = state.tokenizer === "bytes";
    this.chars = this.bytes ? null : [...state.chars];
    this.ids = this.bytes ? null : new Map(this.chars.map((c, i) => [c, i]));
    this.size = this.bytes ? 256 : this.chars.length;
    this.names = Array.from({length: this.size}, (_, i) => this.bytes ? (i < 128 ? String.fromCharCode(i) : "?")
      : this.chars[i]);
  }

  encode(text) {
    if (this.bytes) return [...new TextEncoder().encode(text)];
    const unknown = [...new Set([...text].filter((c) => !this.ids.has(c)))].sort();
    if (unknown.length) {
      throw new Error(`prompt has characters ${JSON.stringify(unknown)} that are not among the model's ` +
        `${this.size}: change it`);
    }
    return [...text].map((c) => this.ids.get(c));
  }

  decoder() {
    if (!this.bytes) return {push: (id) => this.chars[id], flush: () => ""};
    const utf8 = new TextDecoder("utf-8");
    return {push: (id) => utf8.decode(new Uint8Array([id]), {stream: true}), flush: () => utf8.decode()};
  }

  labels(ids) {  // a label per id: its character, at the first byte of a character of several ("" at the others)
    if (!this.bytes) return ids.map((id) => this.chars[id]);
    const out = ids.map(() => ""), decoder = this.decoder();
    let start = 0;
    ids.forEach((id, i) => {
      const text = decoder.push(id);
      if (text) {
        out[start] = [...text].length === 1 ? text : "?";
        start = i + 1;
      }
    });
    return out;
  }
}

async function file(name) {
  let response;
  try {
    response = await fetch(name);
  } catch (error) {  // a page opened as a file may not read the files beside it
    throw new Error(`cannot read ${name} (${error.message}): open this page from a web server, such as ` +
      "python -m http.server in its folder");
  }
  if (!response.ok) throw new Error(`cannot read ${name}: ${response.status} ${response.statusText}`);
  return name.endsWith(".json") ? response.json() : response.arrayBuffer();
}

async function inTab() {
  const [config, buffer, settings] = await Promise.all(
    ["config.json", "model.safetensors", "static/settings.json"].map(file));
  const weights = readSafetensors(buffer);
  const gpt = config.net === "GPT";
  const net = gpt ? new GPT(config.init_args, weights) : new Bigram(config.init_args, weights);
  const looker = gpt ? new GPT(config.init_args, weights) : null;  // its own cache: clicks during a generation
  const tokenizer = new Tokenizer(config.tokenizer);
  const trained = config.trained;
  const run = {
    name: "this model", served: true, net: config.net, attention: gpt,
    step: trained.steps, val_loss: trained.val_loss, tokenizer: config.tokenizer.tokenizer,
    vocab_size: tokenizer.size, block_size: net.block_size, parameters: trained.parameters,
  };
  const defaults = Object.fromEntries(Object.entries(settings).map(([name, s]) => [name, s.default]));

  return {
    async runs() {
      return {runs: [run], device: "your CPU, in this tab (no server)", settings};
    },

    // the events of charlm serve's /api/generate, from the same loop as charlm.sampling.generate
    async generate(body, onEvent, signal) {
      const s = {...defaults, ...Object.fromEntries(Object.entries(body).filter(([, v]) => v !== null))};
      let ids;
      try {
        ids = tokenizer.encode(s.prompt || "\n");
      } catch (error) {
        onEvent("error", {error: error.message});
        return;
      }
      onEvent("start", {run: run.name, prompt: s.prompt || "\n", ids, labels: tokenizer.labels(ids)});
      const random = generator(s.seed), decoder = tokenizer.decoder(), started = performance.now();
      const block = net.block_size;
      let window = ids.slice(-block);
      let logits = net.forward(window), frame = performance.now();
      for (let n = 0; n < s.max_new_tokens; n++) {
        const probs = s.temperature === 0 ? softmax(logits) : distribution(logits, s.temperature, s.top_k, s.top_p);
        const id = s.temperature === 0 ? argmax(logits) : draw(probs, random);
        const order = [...probs.keys()].sort((a, b) => probs[b] - probs[a]).slice(0, 10);
        const top = order.filter((i) => probs[i] > 0).map((i) => [tokenizer.names[i], round4(probs[i])]);
        if (!order.includes(id)) top.push([tokenizer.names[id], round4(probs[id])]);
        const text = decoder.push(id);
        onEvent("token", {id, text, label: tokenizer.names[id], p: round4(probs[id]), top});
        window.push(id);
        if (!(net instanceof GPT)) {
          window = window.slice(-block);
          logits = net.forward(window);
        } else if (window.length <= block) {
          logits = net.step(id, window.length - 1);
        } else {  // the cache is full: re-fill it from the most recent characters
          window = window.slice(-Math.max(1, Math.floor(block / 2)));
          logits = net.forward(window);
        }
        if (performance.now() - frame > 15) {  // let the page draw and take clicks
          await new Promise((resolve) => setTimeout(resolve, 0));
          frame = performance.now();
          if (signal.aborted) return;
        }
      }
      const seconds = (performance.now() - started) / 1000;
      onEvent("end", {text: decoder.flush(), tokens: s.max_new_tokens, seconds: Number(seconds.toFixed(3))});
    },

    // /api/attention's answer: each layer's and head's weights of the last character over the ones it read
    async attention({ids}) {
      const pos = ids.length - 1, first = Math.max(0, pos + 1 - net.block_size);
      const window = ids.slice(first, pos + 1);
      const {weights} = looker.forward(window, true);
      return {ok: true, answer: {run: run.name, pos, first, labels: tokenizer.labels(window), weights}};
    },
  };
}

window.charlmInTab = inTab();
