// dlbook playground: vanilla JavaScript, no dependencies, no build step.
//
// Every call goes to the service that served this page, by a URL relative to it ("../classify"
// from /ui/), so the page works under any host name or path prefix a proxy adds. Refusals from
// the API are JSON {"error", "status", "request_id"}; they are shown as they are, because the
// service words them to say what to fix.
"use strict";

(() => {
  const KEY_STORAGE = "dlbook-api-key";
  const API_ROOT = "../";
  const $ = (id) => document.getElementById(id);

  const DATASETS = {
    "mnist": {
      name: "MNIST digits",
      hint: "Draw one digit, 0–9, large and in the middle.",
    },
    "fashion-mnist": {
      name: "Fashion-MNIST",
      hint: "Draw a piece of clothing, a shoe or a bag: T-shirt, trousers, pullover, dress, coat, sandal, " +
        "shirt, sneaker, bag or ankle boot. A photo on a plain background works best.",
    },
  };

  /** A failed call: the API's own message, its HTTP status (0: no answer) and request id. */
  class ApiError extends Error {
    constructor(message, status, requestId) {
      super(message);
      this.status = status;
      this.requestId = requestId || null;
    }
  }

  // ----- HTTP -------------------------------------------------------------------------------------

  function authHeaders() {
    const key = sessionStorage.getItem(KEY_STORAGE);
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  /** The refusal as an ApiError; 401 also opens the key field. Non-JSON bodies (a proxy's HTML) are cut short. */
  async function readError(response) {
    let message = `${response.status} ${response.statusText || "error"}`.trim();
    let requestId = null;
    const text = await response.text().catch(() => "");
    try {
      const body = JSON.parse(text);
      if (body && typeof body.error === "string") {
        message = body.error;
        requestId = body.request_id;
      } else if (body && typeof body.detail === "string") {
        message = body.detail;
      } else if (text.trim()) {
        message = text.trim().slice(0, 400);
      }
    } catch {
      const plain = text.replace(/<[^>]*>/g, " ").replace(/\s+/g, " ").trim();
      if (plain) message = `${response.status}: ${plain.slice(0, 300)}`;
    }
    if (response.status === 401) showAuth(message);
    return new ApiError(message, response.status, requestId);
  }

  async function api(path, init = {}) {
    const headers = { ...authHeaders(), ...(init.headers || {}) };
    let response;
    try {
      response = await fetch(API_ROOT + path, { ...init, headers });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(`could not reach the server (${err.message}); is it still running?`, 0);
    }
    if (!response.ok) throw await readError(response);
    return response;
  }

  function postJson(path, body, extra = {}) {
    return api(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", ...(extra.headers || {}) },
      body: JSON.stringify(body),
      signal: extra.signal,
    });
  }

  // ----- messages ---------------------------------------------------------------------------------

  function showError(element, err) {
    const lines = [err.message || String(err)];
    const facts = [];
    if (err.status) facts.push(`HTTP ${err.status}`);
    if (err.requestId) facts.push(`request ${err.requestId}`);
    if (err.status === 401) facts.push("enter the API key at the top of the page, then try again");
    if (facts.length) lines.push(`(${facts.join(" · ")})`);
    element.textContent = lines.join("\n");
    element.hidden = false;
  }

  function clearError(element) {
    element.hidden = true;
    element.textContent = "";
  }

  function setStatus(text) {
    $("status").textContent = text;
  }

  // ----- API key ------------------------------------------------------------------------------------

  /** Ask for the key; a stored key that drew a 401 is wrong (or was rotated), so it is dropped. */
  function showAuth(message) {
    const hadKey = Boolean(sessionStorage.getItem(KEY_STORAGE));
    if (hadKey) sessionStorage.removeItem(KEY_STORAGE);
    const note = $("auth-message");
    note.textContent = hadKey ? `That key was refused (${message}).` : "";
    note.hidden = !hadKey;
    $("auth").hidden = false;
    $("api-key").focus();
  }

  $("auth-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("api-key").value = "";
    $("auth").hidden = true;
    loadModels();
  });

  // ----- the model list decides which panels exist ----------------------------------------------------

  function percent(x, digits = 1) {
    return `${(100 * x).toFixed(digits)}%`;
  }

  function describeModel(model) {
    const parts = [model.name];
    if (model.task === "image") {
      parts.push(DATASETS[model.dataset]?.name || model.dataset);
      if (typeof model.test_metrics?.accuracy === "number") parts.push(`test accuracy ${percent(model.test_metrics.accuracy)}`);
    } else if (model.task === "price" && typeof model.test_metrics?.mae_dollars === "number") {
      parts.push(`mean error $${Math.round(model.test_metrics.mae_dollars).toLocaleString("en-US")}`);
    } else if (model.task === "poem" && typeof model.test_metrics?.perplexity === "number") {
      parts.push(`perplexity ${model.test_metrics.perplexity.toFixed(1)}`);
    }
    // A model trained on a cut of its data set (a fresh clone's committed samples) says so.
    if (model.trained_on && model.trained_on.complete === false) parts.push(`trained on ${model.trained_on.label}`);
    return parts.join(" · ");
  }

  function fillSelect(select, models, preferred) {
    const previous = select.value;
    select.replaceChildren(...models.map((model) => {
      const option = document.createElement("option");
      option.value = model.name;
      option.textContent = describeModel(model);
      option.dataset.dataset = model.dataset || "";
      return option;
    }));
    const names = models.map((m) => m.name);
    select.value = names.includes(previous) ? previous : (names.includes(preferred) ? preferred : names[0]);
  }

  /** Panels for the tasks with a loaded model; the single-task services show just their own. */
  async function loadModels() {
    setStatus("Loading the model list…");
    let body;
    try {
      body = await (await postJson("models", {})).json();
    } catch (err) {
      setStatus(err.status === 401
        ? "This service needs an API key: enter it above."
        : `Cannot list the models: ${err.message}`);
      return;
    }
    $("auth").hidden = true;
    const byTask = { image: [], price: [], poem: [] };
    for (const model of body.models || []) (byTask[model.task] ||= []).push(model);
    fillSelect($("image-model"), byTask.image, "fashion-lenet");
    fillSelect($("price-model"), byTask.price, "house-price");
    fillSelect($("poem-model"), byTask.poem, "tang-poem");
    for (const element of document.querySelectorAll("[data-task]")) {
      element.hidden = !byTask[element.dataset.task]?.length;
    }
    updateImageHint();
    const count = (body.models || []).length;
    let text = count
      ? `${count} model${count === 1 ? "" : "s"} loaded: ${(body.models || []).map((m) => m.name).join(", ")}.`
      : "No model is loaded: export some with `python -m training export all`, then restart the service.";
    const samples = (body.models || []).filter((m) => m.trained_on?.complete === false).map((m) => m.name);
    if (samples.length) {
      text += ` Trained on a sample of their data set, not the published models: ${samples.join(", ")}` +
        " (fetch the full sets with `python -m training fetch` and run `./dlbook up` again).";
    }
    if (body.problems?.length) text += ` Problems: ${body.problems.join("; ")}`;
    setStatus(text);
  }

  // ----- images ----------------------------------------------------------------------------------------

  const canvas = $("draw");
  const pen = canvas.getContext("2d");
  let stroke = null; // the last point of the stroke being drawn, or null
  let inked = false;
  let imageRequest = 0; // answers to older requests are dropped when a newer one was sent

  function updateImageHint() {
    const option = $("image-model").selectedOptions[0];
    $("image-hint").textContent = DATASETS[option?.dataset.dataset]?.hint || "";
  }

  function clearCanvas() {
    // Dark ink on white, as people draw; the service inverts light backgrounds to the data sets' look.
    pen.fillStyle = "#fff";
    pen.fillRect(0, 0, canvas.width, canvas.height);
    inked = false;
  }

  function canvasPoint(event) {
    const box = canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - box.left) * canvas.width) / box.width,
      y: ((event.clientY - box.top) * canvas.height) / box.height,
    };
  }

  function drawTo(point) {
    pen.strokeStyle = "#000";
    pen.lineWidth = Number($("pen-width").value);
    pen.lineCap = "round";
    pen.lineJoin = "round";
    pen.beginPath();
    pen.moveTo(stroke.x, stroke.y);
    pen.lineTo(point.x, point.y);
    pen.stroke();
    stroke = point;
    inked = true;
  }

  // Pointer events cover mouse, touch and pen alike; CSS touch-action: none keeps a finger from scrolling.
  canvas.addEventListener("pointerdown", (event) => {
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    stroke = canvasPoint(event);
    drawTo(stroke); // a tap leaves a dot
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!stroke) return;
    const points = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
    for (const each of points.length ? points : [event]) drawTo(canvasPoint(each));
  });
  function endStroke() {
    if (!stroke) return;
    stroke = null;
    if ($("auto-classify").checked) classifyDrawing();
  }
  canvas.addEventListener("pointerup", endStroke);
  canvas.addEventListener("pointercancel", endStroke);

  $("clear-drawing").addEventListener("click", () => {
    clearCanvas();
    $("image-result").hidden = true;
    clearError($("image-error"));
  });
  $("classify-drawing").addEventListener("click", () => classifyDrawing());
  $("image-model").addEventListener("change", () => {
    updateImageHint();
    if (inked) classifyDrawing();
  });
  $("image-top-k").addEventListener("change", () => { if (inked) classifyDrawing(); });

  function classifyDrawing() {
    if (!inked) {
      showError($("image-error"), new Error("draw something first (or upload a photo)"));
      return;
    }
    canvas.toBlob((blob) => classify(blob, "drawing.png"), "image/png");
  }

  let thumbUrl = null;
  $("image-file").addEventListener("change", () => {
    const file = $("image-file").files[0];
    if (!file) return;
    if (thumbUrl) URL.revokeObjectURL(thumbUrl);
    thumbUrl = URL.createObjectURL(file);
    const thumb = $("upload-thumb");
    thumb.hidden = false;
    thumb.onerror = () => { thumb.hidden = true; }; // not a picture the browser can show: the API will say more
    thumb.src = thumbUrl;
    classify(file, file.name);
  });

  async function classify(blob, filename) {
    const mine = ++imageRequest;
    const form = new FormData();
    form.append("images", blob, filename);
    form.append("model", $("image-model").value);
    form.append("top_k", $("image-top-k").value);
    form.append("return_frame", "true");
    clearError($("image-error"));
    try {
      const body = await (await api("classify", { method: "POST", body: form })).json();
      if (mine === imageRequest) showPrediction(body);
    } catch (err) {
      if (mine !== imageRequest) return;
      $("image-result").hidden = true;
      showError($("image-error"), err);
    }
  }

  function showPrediction(body) {
    const best = body.predictions[0];
    $("image-label").textContent = best.label;
    $("image-label-zh").textContent = best.label_zh;
    $("image-probability").textContent = percent(best.probability);
    $("image-bars").replaceChildren(...best.top_k.map((entry) => {
      const item = document.createElement("li");
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = `${entry.label} · ${entry.label_zh}`;
      name.title = name.textContent;
      const track = document.createElement("span");
      track.className = "track";
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.width = percent(entry.probability, 2);
      track.append(fill);
      const pct = document.createElement("span");
      pct.className = "pct";
      pct.textContent = percent(entry.probability);
      item.append(name, track, pct);
      return item;
    }));
    drawFrame(best.frame);
    $("image-meta").textContent = `${body.model} · version ${body.version}`;
    $("image-result").hidden = false;
  }

  /** The 28×28 frame (0–255, light on dark, as the data sets) pixel for pixel; CSS scales it up unblurred. */
  function drawFrame(frame) {
    const preview = $("frame-preview");
    if (!Array.isArray(frame)) return;
    const size = frame.length;
    preview.width = size;
    preview.height = size;
    const context = preview.getContext("2d");
    const pixels = context.createImageData(size, size);
    frame.forEach((row, y) => row.forEach((value, x) => {
      const v = Math.max(0, Math.min(255, Math.round(value)));
      const at = 4 * (y * size + x);
      pixels.data[at] = pixels.data[at + 1] = pixels.data[at + 2] = v;
      pixels.data[at + 3] = 255;
    }));
    context.putImageData(pixels, 0, 0);
  }

  // ----- house prices ----------------------------------------------------------------------------------

  const dollars = new Intl.NumberFormat("en-US", { style: "currency", currency: "USD", maximumFractionDigits: 0 });

  /** The field's caption as the person reads it, for messages about that field. */
  function fieldName(element) {
    const label = element.closest("label");
    if (!label) return element.name;
    const caption = label.cloneNode(true);
    for (const control of caption.querySelectorAll("input, select, output")) control.remove();
    return caption.textContent.replace(/\s+/g, " ").trim() || element.name;
  }

  /** One Kaggle record from the form: a blank optional field is left out, which the service reads as *unknown*
   * and fills in as similar training houses have it (listed in the answer's `imputed`); a "None" choice is sent
   * as "NA", the data set's "none" (no basement…). */
  function houseRecord(form) {
    const record = {};
    const problems = [];
    for (const element of form.querySelectorAll("fieldset [name]")) {
      const value = element.value.trim();
      if (value === "") {
        if (element.required) problems.push(`${fieldName(element)} is required`);
        continue;
      }
      if (!element.checkValidity()) {
        problems.push(`${fieldName(element)}: ${element.validationMessage}`);
        continue;
      }
      record[element.name] = element.dataset.kind === "number" ? Number(value) : value;
    }
    return { record, problems };
  }

  $("house-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const error = $("price-error");
    clearError(error);
    const { record, problems } = houseRecord(event.target);
    if (problems.length) {
      $("price-result").hidden = true;
      showError(error, new Error(problems.join("\n")));
      return;
    }
    const button = $("price-submit");
    button.disabled = true;
    try {
      const body = await (await postJson("predict_price", { records: [record], model: $("price-model").value })).json();
      $("price-value").textContent = dollars.format(body.prices[0]);
      const range = body.price_ranges?.[0];
      $("price-range").textContent = range
        ? `${Math.round(100 * body.range_coverage)}% range: ${dollars.format(range[0])} – ${dollars.format(range[1])}`
        : "";
      $("price-range").hidden = !range;
      const imputed = body.imputed?.[0]?.length ?? 0;
      $("price-meta").textContent = `${body.model} · version ${body.version} · from ${Object.keys(record).length} fields` +
        (imputed ? ` · ${imputed} more filled in as similar training houses have them` : "");
      $("price-result").hidden = false;
    } catch (err) {
      $("price-result").hidden = true;
      showError(error, err);
    } finally {
      button.disabled = false;
    }
  });
  $("house-form").addEventListener("reset", () => {
    $("price-result").hidden = true;
    clearError($("price-error"));
  });

  // ----- poems -------------------------------------------------------------------------------------------

  const LINE_ENDS = new Set(["，", "。", "？", "！", "；"]);
  let poemAbort = null;

  $("poem-temperature").addEventListener("input", () => {
    const temperature = Number($("poem-temperature").value);
    $("poem-temperature-value").textContent = temperature === 0 ? "0 · greedy" : temperature.toFixed(2);
  });

  /** One poem on screen, a line per clause, growing a character at a time. */
  class PoemView {
    constructor(parent) {
      this.element = document.createElement("div");
      this.element.className = "poem streaming";
      parent.append(this.element);
      this.line = null;
    }

    add(char) {
      if (!this.line) {
        this.line = document.createElement("span");
        this.line.className = "line";
        this.element.append(this.line);
      }
      this.line.textContent += char;
      if (LINE_ENDS.has(char)) this.line = null;
    }

    finish(text, prosody) {
      // The whole poem from the done event is authoritative: redraw from it.
      this.element.replaceChildren();
      this.line = null;
      for (const char of text) this.add(char);
      this.element.classList.remove("streaming");
      if (prosody) this.showSound(prosody);
    }

    /** Each line's tone marks (平 仄, 中 = either reading, ？ = not in the table) under it, and the rhyme group. */
    showSound(prosody) {
      const lines = [...this.element.querySelectorAll(".line")];
      lines.forEach((line, i) => {
        if (prosody.tones[i] === undefined) return;
        const marks = document.createElement("span");
        marks.className = "tones";
        marks.textContent = prosody.tones[i];
        if (prosody.pattern?.[i] === false) marks.classList.add("off-pattern");
        line.after(marks);
      });
      const rhyme = document.createElement("span");
      rhyme.className = "rhyme";
      rhyme.textContent = prosody.rhyme_group ? `韵 ${prosody.rhyme_group}` : "no single rhyme group · 不押韵";
      this.element.append(rhyme);
    }
  }

  function poemParams(form) {
    const params = {};
    for (const element of form.querySelectorAll("fieldset [name]")) {
      const value = element.value.trim();
      if (value === "") continue;
      params[element.name] = element.dataset.kind === "number" ? Number(value) : value;
    }
    params.model = $("poem-model").value;
    return params;
  }

  function setPoemState(state, text) {
    const status = $("poem-status");
    status.dataset.state = state;
    status.textContent = text;
  }

  /** Server-Sent Events over a POST: EventSource cannot send a body, so read the stream by hand. */
  async function* sseEvents(response) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      // CRLF and lone CR end lines too; a CR at the very end waits in case an LF follows.
      buffer = (buffer + value).replace(/\r\n/g, "\n").replace(/\r(?=.)/gs, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let kind = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (!line || line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const content = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") kind = content;
          else if (field === "data") data.push(content);
        }
        if (data.length) yield { kind, data: JSON.parse(data.join("\n")) };
      }
    }
  }

  $("poem-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    if (poemAbort) poemAbort.abort();
    const controller = new AbortController();
    poemAbort = controller;
    const error = $("poem-error");
    const output = $("poem-output");
    clearError(error);
    output.replaceChildren();
    $("poem-meta").textContent = "";
    $("poem-count").textContent = "0";
    $("poem-stop").disabled = false;
    setPoemState("waiting", "Waiting for the server…");
    const views = [];
    let received = 0;
    let finished = false;
    try {
      const response = await postJson("generate_poem_stream", poemParams(event.target),
        { headers: { Accept: "text/event-stream" }, signal: controller.signal });
      setPoemState("streaming", "Writing…");
      for await (const { kind, data } of sseEvents(response)) {
        if (kind === "token") {
          views[data.index] ||= new PoemView(output);
          views[data.index].add(data.char);
          received += 1;
          $("poem-count").textContent = String(received);
        } else if (kind === "done") {
          data.poems.forEach((poem, i) => (views[i] ||= new PoemView(output)).finish(poem.poem, poem.prosody));
          const seeds = data.poems.map((p) => p.seed).join(", ");
          $("poem-meta").textContent = `${data.model} · version ${data.version} · seed ${seeds}`;
          setPoemState("done", "Done");
          finished = true;
        } else if (kind === "error") {
          throw new ApiError(data.error || "generation failed", 0);
        }
      }
      if (!finished) throw new ApiError("the stream ended before the poem was finished; try again", 0);
    } catch (err) {
      if (err.name === "AbortError") {
        setPoemState("stopped", "Stopped");
      } else {
        setPoemState("error", "Failed");
        showError(error, err);
      }
    } finally {
      if (poemAbort === controller) {
        poemAbort = null;
        $("poem-stop").disabled = true;
      }
    }
  });

  $("poem-stop").addEventListener("click", () => poemAbort?.abort());

  // ----- start ---------------------------------------------------------------------------------------------

  clearCanvas();
  loadModels();
})();
