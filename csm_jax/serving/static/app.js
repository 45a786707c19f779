// csm-jax web client: speaks the WebSocket protocol v1 (docs/protocol.md). No build step, no network fetches
// besides the page's own server.

const $ = (id) => document.getElementById(id);

const DEFAULT_SAMPLE_RATE = 24000;
const DEFAULT_FRAME_SAMPLES = 1920;
const PLAYBACK_LEAD_S = 0.12; // jitter buffer before the first frame of a response (and after an underrun)
const RECORD_CHUNK_S = 0.1; // size of the binary chunks of a recorded user turn
const TALK_CHUNK_S = 0.08; // size of the microphone chunks in talk mode (small: the server hears speech end sooner)
const TALK_QUEUE_MAX_S = 10; // microphone audio kept while waiting for talk.started (older audio is dropped)
const MAX_ERRORS_SHOWN = 50;

// Test/automation hook: kept up to date as events arrive.
const hook = {
  connected: false,
  ready: null,
  conversationId: null,
  framesReceived: 0, // frames of the current (or last) response
  samplesReceived: 0,
  totalFrames: 0, // all binary frames on this page
  framesScheduled: 0, // frames handed to WebAudio
  framesPlayed: 0, // frames WebAudio finished playing (not counting frames stopped by cancel or barge-in)
  underruns: 0,
  lastStarted: null,
  lastDone: null,
  lastStored: null,
  recording: false,
  recordedSamples: 0,
  recordSampleRate: null,
  history: [],
  errors: [],
  events: [], // every JSON event received
  sent: [], // every JSON event sent
  talk: {
    active: false, // from pressing Talk until talk.stopped (or its failure)
    state: "off", // off, starting, listening, you are speaking, thinking, speaking, stopping
    states: [], // the states shown, in order (the last 500 changes)
    sampleRate: null, // of the microphone
    sentSamples: 0, // microphone samples sent to the server
    started: null, // the talk.started event
    stopped: null, // the talk.stopped event
    turns: [], // the user's turns stored in talk mode: turn.stored's `turn` plus `transcribed`
    replies: [], // {reply_id, text, done, interrupted, responses: [response.done...], framesReceived,
    //             framesScheduled, framesPlayed}
    events: [], // the talk-mode events received: talk.*, speech.*, reply.*, the replies' responses, turns, errors
    bargeIns: [], // {replies: [reply_id...], stoppedFrames}: user speech that cut off a reply here
  },
  playback() {
    // Snapshot of the playback AudioContext: its state, clock and where the next frame will start.
    const ctx = state.play.ctx;
    return ctx === null ? null : {state: ctx.state, sampleRate: ctx.sampleRate, currentTime: ctx.currentTime,
      nextTime: state.play.nextTime, queued: state.play.sources.size};
  },
};
window.csm = hook;

const state = {
  ws: null,
  ready: null,
  sessionId: null, // conversation started on this connection
  lastConversationId: null, // survives reconnects (resume target)
  nextId: 1,
  pending: new Map(), // request id -> type
  response: null, // {requestId, responseId, cancelled, sentAt, firstFrameAt, frames}
  recording: null,
  talk: null, // {phase: "starting" | "on" | "stopping", requestId, started, queue, ...}: talk mode on this page
  play: {ctx: null, gain: null, nextTime: 0, sources: new Set(), stopped: new WeakSet()},
};

// ---------------------------------------------------------------------------------------------- helpers

function limits() {
  return (state.ready && state.ready.limits) || {};
}

function sampleRate() {
  return (state.ready && state.ready.sample_rate) || DEFAULT_SAMPLE_RATE;
}

function isOpen() {
  return state.ws !== null && state.ws.readyState === WebSocket.OPEN;
}

function isReady() {
  return isOpen() && state.ready !== null;
}

function intValue(id) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const n = Number(raw);
  return Number.isFinite(n) ? Math.trunc(n) : undefined;
}

function floatValue(id) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const n = Number(raw);
  return Number.isFinite(n) ? n : undefined;
}

function setStatus(stateName, text) {
  const el = $("status");
  el.dataset.state = stateName;
  el.textContent = text;
}

function fmt(value, digits = 1) {
  if (typeof value !== "number") return String(value);
  return Number.isInteger(value) ? String(value) : value.toFixed(digits);
}

function fillDl(dl, entries) {
  dl.replaceChildren();
  for (const [key, value] of entries) {
    const dt = document.createElement("dt");
    dt.textContent = key;
    const dd = document.createElement("dd");
    dd.textContent = value === undefined || value === null ? "-" : String(value);
    dd.dataset.key = key;
    dl.append(dt, dd);
  }
}

// ---------------------------------------------------------------------------------------------- errors

function showError(code, message, id) {
  const entry = {code, message, id: id === undefined ? null : id, at: new Date().toISOString()};
  hook.errors.push(entry);
  const li = document.createElement("li");
  li.dataset.code = code;
  const codeEl = document.createElement("code");
  codeEl.textContent = code;
  const what = id !== undefined && state.pending.has(id) ? ` (${state.pending.get(id)} #${id})` : "";
  li.append(codeEl, document.createTextNode(`${what}: ${message}`));
  const list = $("errors");
  list.prepend(li);
  while (list.children.length > MAX_ERRORS_SHOWN) list.lastElementChild.remove();
}

// ---------------------------------------------------------------------------------------------- sending

function send(type, fields = {}) {
  if (!isOpen()) {
    showError("not_connected", `cannot send ${type}: not connected`);
    return null;
  }
  const id = state.nextId++;
  const message = {type, ...fields, id};
  state.ws.send(JSON.stringify(message));
  state.pending.set(id, type);
  hook.sent.push(message);
  return id;
}

function sendBinary(buffer) {
  if (!isOpen()) return false;
  state.ws.send(buffer);
  return true;
}

function ensureSession() {
  // Say / record without a session on this connection: resume the last conversation, or start a new one.
  if (state.sessionId !== null) return;
  if (state.pending.size > 0 && [...state.pending.values()].includes("session.start")) return;
  const fields = state.lastConversationId ? {conversation_id: state.lastConversationId} : {};
  send("session.start", fields);
}

// ---------------------------------------------------------------------------------------------- connection

function wsUrl() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const token = new URLSearchParams(location.search).get("token");
  let url = `${proto}//${location.host}/ws`;
  if (token) url += `?token=${encodeURIComponent(token)}`;
  return url;
}

function connect() {
  if (state.ws !== null) return;
  ensurePlayback();
  if (!location.host) {
    showError("client", "open this page from the server (http://HOST:PORT/), not from a file");
    return;
  }
  const url = wsUrl();
  $("server-url").textContent = url.replace(/token=[^&]*/, "token=…");
  setStatus("connecting", "Connecting…");
  let ws;
  try {
    ws = new WebSocket(url);
  } catch (err) {
    setStatus("disconnected", "Disconnected");
    showError("client", `cannot open ${url}: ${err}`);
    return;
  }
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  ws.onopen = () => {
    if (state.ws !== ws) return;
    setStatus("open", "Connected, waiting for the server…");
  };
  ws.onmessage = (event) => {
    if (state.ws !== ws) return;
    if (typeof event.data === "string") {
      let parsed;
      try {
        parsed = JSON.parse(event.data);
      } catch (err) {
        showError("client", `server sent invalid JSON: ${err}`);
        return;
      }
      handleEvent(parsed);
    } else {
      handleFrame(event.data);
    }
  };
  ws.onclose = (event) => {
    if (state.ws !== ws) return;
    onDisconnected(event);
  };
  updateUi();
}

function disconnect() {
  if (state.ws === null) return;
  const ws = state.ws;
  ws.close(1000, "client disconnect");
  onDisconnected({code: 1000, reason: "client disconnect", wasClean: true});
}

function onDisconnected(event) {
  const wasReady = state.ready !== null;
  state.ws = null;
  state.ready = null;
  state.sessionId = null;
  state.pending.clear();
  hook.connected = false;
  if (state.response !== null) {
    state.response = null;
  }
  if (state.recording !== null) abortRecording("connection closed");
  if (state.talk !== null) endTalk("connection closed");
  for (const reply of hook.talk.replies) {
    if (!reply.done) {
      reply.done = true;
      reply.lost = true; // the connection closed before its reply.done
      renderReply(reply);
    }
  }
  let text = `Disconnected (code ${event.code}${event.reason ? `: ${event.reason}` : ""})`;
  if (!wasReady && event.code === 1006) {
    text += " — handshake refused or server unreachable (token? origin?)";
  }
  setStatus("disconnected", text);
  $("session-info").textContent = state.lastConversationId ? "(not active: resume to continue)" : "";
  updateUi();
}

// ---------------------------------------------------------------------------------------------- events

function handleEvent(ev) {
  hook.events.push(ev);
  const id = ev.id;
  if (isTalkEvent(ev)) hook.talk.events.push(ev);
  switch (ev.type) {
    case "ready":
      onReady(ev);
      break;
    case "session.started":
      state.pending.delete(id);
      onSessionStarted(ev);
      break;
    case "response.started":
      onResponseStarted(ev);
      break;
    case "response.done":
      state.pending.delete(id);
      onResponseDone(ev);
      break;
    case "audio.started":
      state.pending.delete(id);
      onAudioStarted(ev);
      break;
    case "turn.stored": {
      // Turns of talk mode come unasked (no id); a recorded turn answers its audio.end.
      const answered = state.pending.get(id);
      state.pending.delete(id);
      if (answered === "audio.end") onTurnStored(ev);
      else onTalkTurnStored(ev);
      break;
    }
    case "talk.started":
      state.pending.delete(id);
      onTalkStarted(ev);
      break;
    case "talk.stopped":
      state.pending.delete(id);
      onTalkStopped(ev);
      break;
    case "speech.started":
      onSpeechStarted(ev);
      break;
    case "speech.stopped":
      onSpeechStopped(ev);
      break;
    case "reply.started":
      onReplyStarted(ev);
      break;
    case "reply.delta":
      onReplyDelta(ev);
      break;
    case "reply.done":
      onReplyDone(ev);
      break;
    case "history":
      state.pending.delete(id);
      onHistory(ev);
      break;
    case "error":
      onErrorEvent(ev);
      state.pending.delete(id);
      break;
    default:
      // Unknown events are kept in window.csm.events; nothing to show.
      break;
  }
  updateUi();
}

function onReady(ev) {
  state.ready = ev;
  hook.ready = ev;
  hook.connected = true;
  setStatus("ready", `Connected to ${ev.model || "server"}`);
  if (ev.protocol !== 1) {
    showError("client", `server speaks protocol ${ev.protocol}; this page speaks 1`);
  }
  const lim = ev.limits || {};
  fillDl($("limits"), [
    ["model", ev.model],
    ["protocol", ev.protocol],
    ["sample_rate", ev.sample_rate],
    ["frame_samples", ev.frame_samples],
    ["num_codebooks", ev.num_codebooks],
    ...Object.entries(lim),
  ]);
  // Not in protocol v1's list, but servers may send their sampling defaults: show them as placeholders.
  const defaults = ev.defaults || {};
  if (typeof defaults.temperature === "number") $("temperature").placeholder = `server default ${defaults.temperature}`;
  if (typeof defaults.top_k === "number") $("top-k").placeholder = `server default ${defaults.top_k}`;
  // The model's voice presets: the server's default first, then each by name, then none.
  const voice = $("voice");
  voice.replaceChildren();
  const option = (value, text) => {
    const el = document.createElement("option");
    el.value = value;
    el.textContent = text;
    voice.append(el);
  };
  option("", `server default (${typeof defaults.voice === "string" ? defaults.voice : "none"})`);
  for (const name of Array.isArray(ev.voices) ? ev.voices : []) option(`preset:${name}`, name);
  option("none", "none");
  const maxMs = $("max-audio-ms");
  if (typeof lim.max_audio_ms === "number") {
    maxMs.max = String(lim.max_audio_ms);
    if (intValue("max-audio-ms") !== undefined && intValue("max-audio-ms") > lim.max_audio_ms) {
      maxMs.value = String(lim.max_audio_ms);
    }
  }
  updateTextCount();
}

function onSessionStarted(ev) {
  state.sessionId = ev.conversation_id;
  state.lastConversationId = ev.conversation_id;
  hook.conversationId = ev.conversation_id;
  $("conversation-id").textContent = ev.conversation_id;
  $("resume-id").value = ev.conversation_id;
  $("session-info").textContent = `(${ev.resumed ? "resumed" : "new"}, ${ev.turns} stored turn${ev.turns === 1 ? "" : "s"})`;
  try {
    localStorage.setItem("csm.lastConversationId", ev.conversation_id);
  } catch (err) {
    // storage can be disabled; resuming by id still works
  }
  hook.history = [];
  renderHistory([]);
  send("history");
}

function onResponseStarted(ev) {
  hook.lastStarted = ev;
  if (state.response === null) {
    // A response the server started itself (a sentence of a talk-mode reply), or one we did not track.
    state.response = {requestId: ev.id, responseId: null, cancelled: false, sentAt: performance.now(),
      firstFrameAt: null, frames: 0, reply: null};
    hook.framesReceived = 0;
    hook.samplesReceived = 0;
  }
  state.response.responseId = ev.response_id;
  if (ev.reply_id !== undefined) {
    const reply = findReply(ev.reply_id) || addReply(ev.reply_id); // reply.started normally came first
    state.response.reply = reply;
    if (reply.muted) state.response.cancelled = true; // barged in: the rest of this reply is not played
  }
  $("stats").textContent = `Streaming ${ev.response_id} (context turns: ${ev.context_turns}, prompt rows: ${ev.prompt_rows})…`;
}

function onResponseDone(ev) {
  hook.lastDone = ev;
  const resp = state.response;
  const clientTtfa = resp && resp.firstFrameAt !== null ? resp.firstFrameAt - resp.sentAt : null;
  state.response = null;
  const started = hook.lastStarted && hook.lastStarted.response_id === ev.response_id ? hook.lastStarted : {};
  const dl = document.createElement("dl");
  fillDl(dl, [
    ["response_id", ev.response_id],
    ["stop_reason", ev.stop_reason],
    ["frames", ev.frames],
    ["audio_ms", fmt(ev.audio_ms, 0)],
    ["ttfa_ms", fmt(ev.ttfa_ms, 1)],
    ["rtf", fmt(ev.rtf, 3)],
    ["turn_id", ev.turn_id],
    ["context_turns", started.context_turns],
    ["prompt_rows", started.prompt_rows],
    ["frames received", hook.framesReceived],
    ["client ttfa_ms", clientTtfa === null ? null : fmt(clientTtfa, 1)],
    ["underruns", hook.underruns],
  ]);
  $("stats").replaceChildren(dl);
  if (ev.reply_id !== undefined) {
    const reply = (resp && resp.reply) || findReply(ev.reply_id);
    if (reply) reply.responses.push(ev);
  }
  if (ev.turn_id !== null && ev.turn_id !== undefined && state.sessionId !== null) send("history");
}

function onTurnStored(ev) {
  hook.lastStored = ev;
  const turn = ev.turn || {};
  $("record-status").textContent =
    `Stored user turn ${turn.index !== undefined ? `#${turn.index}` : ""} (${ev.frames} frames).`;
  if (state.sessionId !== null) send("history");
}

function onHistory(ev) {
  if (ev.conversation_id && state.sessionId && ev.conversation_id !== state.sessionId) return;
  hook.history = ev.turns || [];
  renderHistory(hook.history);
}

function renderHistory(turns) {
  const list = $("history");
  list.replaceChildren();
  for (const turn of turns) {
    const li = document.createElement("li");
    li.dataset.turnId = String(turn.turn_id);
    li.dataset.source = turn.source;
    li.className = `turn ${turn.source}`;
    const meta = document.createElement("span");
    meta.className = "meta";
    const seconds = ((turn.frames || 0) * DEFAULT_FRAME_SAMPLES / DEFAULT_SAMPLE_RATE).toFixed(2);
    meta.textContent = `#${turn.index} · speaker ${turn.speaker} · ${turn.source} · ${turn.frames} frames (${seconds} s)`;
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = turn.text ? turn.text : "(no transcript)";
    li.append(meta, text);
    if (turn.created_at) li.title = turn.created_at;
    list.append(li);
  }
  if (turns.length === 0) {
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent = "No turns yet.";
    list.append(li);
  }
}

function onErrorEvent(ev) {
  const requestType = ev.id !== undefined ? state.pending.get(ev.id) : undefined;
  showError(ev.code || "error", ev.message || "", ev.id);
  if (requestType === "say" && state.response !== null && state.response.requestId === ev.id) {
    state.response = null;
    $("stats").textContent = `Say failed: ${ev.code}`;
  }
  if (requestType === "session.start" && state.sessionId === null && ev.code === "unknown_conversation") {
    state.lastConversationId = null;
  }
  const talk = state.talk;
  if (talk !== null) {
    // Talk mode goes on after errors (a failed transcription or reply, a dropped chunk), except when talk.start
    // itself failed or the server says talk mode is not on.
    if (requestType === "talk.start" && ev.id === talk.requestId) {
      endTalk(`${ev.code}: talk mode did not start`);
    } else if (ev.code === "not_talking") {
      endTalk("the server says talk mode is not on");
    }
  }
  const rec = state.recording;
  if (rec !== null) {
    const turnGone = ["audio_too_long", "bad_audio", "no_audio_turn"].includes(ev.code);
    if ((requestType === "audio.start" && ev.id === rec.requestId) || turnGone) {
      abortRecording(`${ev.code}: the turn was not stored`);
    }
  }
}

// ---------------------------------------------------------------------------------------------- playback

function ensurePlayback() {
  const play = state.play;
  if (play.ctx === null) {
    const Ctx = window.AudioContext || window.webkitAudioContext;
    if (!Ctx) {
      showError("client", "this browser has no WebAudio: audio will not play");
      return;
    }
    try {
      play.ctx = new Ctx({sampleRate: DEFAULT_SAMPLE_RATE, latencyHint: "interactive"});
    } catch (err) {
      play.ctx = new Ctx({latencyHint: "interactive"}); // buffers at 24 kHz are resampled by WebAudio
    }
    play.gain = play.ctx.createGain();
    play.gain.gain.value = Number($("volume").value);
    play.gain.connect(play.ctx.destination);
  }
  if (play.ctx.state === "suspended") play.ctx.resume().catch(() => {});
}

function pcm16ToFloat(buffer) {
  const view = new DataView(buffer);
  const n = buffer.byteLength >> 1;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = view.getInt16(i * 2, true) / 32768;
  return out;
}

function scheduleFrame(samples, firstOfResponse, reply) {
  const play = state.play;
  if (play.ctx === null || samples.length === 0) return;
  const ctx = play.ctx;
  const buffer = ctx.createBuffer(1, samples.length, sampleRate());
  buffer.copyToChannel(samples, 0);
  const source = ctx.createBufferSource();
  source.buffer = buffer;
  source.connect(play.gain);
  const now = ctx.currentTime;
  if (play.nextTime < now + 0.005) {
    if (!firstOfResponse) hook.underruns += 1;
    play.nextTime = now + PLAYBACK_LEAD_S;
  }
  source.start(play.nextTime);
  play.nextTime += buffer.duration;
  play.sources.add(source);
  source.onended = () => {
    play.sources.delete(source);
    if (!play.stopped.has(source)) {
      hook.framesPlayed += 1;
      if (reply) reply.framesPlayed += 1;
    }
    if (play.sources.size === 0) updateTalkUi(); // "speaking" ends with the audio
  };
  hook.framesScheduled += 1;
  if (reply) reply.framesScheduled += 1;
}

function stopPlayback() {
  const play = state.play;
  for (const source of play.sources) {
    play.stopped.add(source);
    try {
      source.stop();
    } catch (err) {
      // already stopped
    }
  }
  play.sources.clear();
  play.nextTime = 0;
}

function handleFrame(data) {
  const samples = pcm16ToFloat(data);
  hook.totalFrames += 1;
  const resp = state.response;
  if (resp === null) return; // a frame outside a response (protocol says this does not happen)
  hook.framesReceived += 1;
  hook.samplesReceived += samples.length;
  resp.frames += 1;
  if (resp.reply) resp.reply.framesReceived += 1;
  if (resp.firstFrameAt === null) resp.firstFrameAt = performance.now();
  if (!resp.cancelled) scheduleFrame(samples, resp.frames === 1, resp.reply);
}

// ---------------------------------------------------------------------------------------------- say / cancel

function say() {
  if (!isReady()) {
    showError("not_connected", "connect first");
    return;
  }
  if (state.response !== null || state.talk !== null) return;
  ensurePlayback();
  ensureSession();
  const fields = {text: $("text").value, speaker: intValue("speaker") ?? 0, ...samplingFields()};
  hook.framesReceived = 0;
  hook.samplesReceived = 0;
  hook.lastDone = null;
  hook.lastStarted = null;
  const id = send("say", fields);
  if (id === null) return;
  state.response = {requestId: id, responseId: null, cancelled: false, sentAt: performance.now(),
    firstFrameAt: null, frames: 0, reply: null};
  $("stats").textContent = "Waiting for the response…";
  updateUi();
}

function cancel() {
  if (state.response === null) return;
  state.response.cancelled = true;
  stopPlayback();
  send("cancel");
  updateUi();
}

// ---------------------------------------------------------------------------------------------- recording

function encodeChunk(samples, encoding) {
  const n = samples.length;
  if (encoding === "float32") {
    const view = new DataView(new ArrayBuffer(n * 4));
    for (let i = 0; i < n; i++) view.setFloat32(i * 4, samples[i], true);
    return view.buffer;
  }
  const view = new DataView(new ArrayBuffer(n * 2));
  for (let i = 0; i < n; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(i * 2, s < 0 ? Math.round(s * 32768) : Math.round(s * 32767), true);
  }
  return view.buffer;
}

function recordStatus(rec) {
  const seconds = rec.samples / (rec.sampleRate || 1);
  const phase = rec.phase === "recording" ? "Recording" : rec.phase === "starting" ? "Starting" : "Finishing";
  $("record-status").textContent = `${phase}… ${seconds.toFixed(1)} s at ${rec.sampleRate || "?"} Hz`;
}

function pushRecorded(rec, samples) {
  if (state.recording !== rec || rec.ended) return;
  // Keep every chunk under max_message_bytes.
  const bytesPerSample = rec.encoding === "float32" ? 4 : 2;
  const maxBytes = limits().max_message_bytes;
  const maxSamples = typeof maxBytes === "number" ? Math.max(1, Math.floor(maxBytes / bytesPerSample)) : samples.length;
  for (let offset = 0; offset < samples.length; offset += maxSamples) {
    const part = samples.subarray(offset, Math.min(samples.length, offset + maxSamples));
    const chunk = encodeChunk(part, rec.encoding);
    if (rec.started) {
      sendBinary(chunk);
    } else {
      rec.queue.push(chunk);
    }
    rec.samples += part.length;
  }
  hook.recordedSamples = rec.samples;
}

async function openCapture(cap, blockSeconds, onSamples, wanted) {
  // Opens the microphone into `cap` (stream, ctx, source, node, sink, sampleRate): mono Float32Array blocks of
  // `blockSeconds` go to onSamples. Throws if the microphone is unavailable or `wanted()` turns false meanwhile;
  // the caller releases what was opened (releaseCapture).
  cap.stream = await navigator.mediaDevices.getUserMedia({
    audio: {channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true},
  });
  if (!wanted()) throw new Error("aborted");
  const Ctx = window.AudioContext || window.webkitAudioContext;
  cap.ctx = new Ctx({latencyHint: "interactive"});
  if (cap.ctx.state === "suspended") await cap.ctx.resume();
  cap.sampleRate = cap.ctx.sampleRate;
  cap.source = cap.ctx.createMediaStreamSource(cap.stream);
  cap.sink = cap.ctx.createGain();
  cap.sink.gain.value = 0; // the capture node must reach the destination to be processed; keep it silent
  cap.sink.connect(cap.ctx.destination);
  const blockSize = Math.round(cap.sampleRate * blockSeconds);
  if (cap.ctx.audioWorklet && typeof AudioWorkletNode !== "undefined") {
    await cap.ctx.audioWorklet.addModule(new URL("pcm-worklet.js", import.meta.url));
    if (!wanted()) throw new Error("aborted");
    cap.node = new AudioWorkletNode(cap.ctx, "pcm-capture", {
      numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1], processorOptions: {blockSize},
    });
    cap.node.port.onmessage = (event) => {
      if (event.data instanceof Float32Array) onSamples(event.data);
      else if (event.data === "flushed" && cap.onFlushed) cap.onFlushed();
    };
  } else {
    cap.node = cap.ctx.createScriptProcessor(4096, 1, 1);
    cap.node.onaudioprocess = (event) => onSamples(new Float32Array(event.inputBuffer.getChannelData(0)));
  }
  cap.source.connect(cap.node);
  cap.node.connect(cap.sink);
}

async function startRecording() {
  if (state.recording !== null || state.talk !== null || !isReady()) return;
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    showError("client", "no microphone access here (needs https or localhost)");
    return;
  }
  ensurePlayback();
  const rec = {
    phase: "starting", encoding: $("encoding").value, speaker: intValue("record-speaker") ?? 1,
    transcriptAtStart: $("transcript").value, started: false, ended: false, captureDone: false,
    queue: [], samples: 0, sampleRate: null, requestId: null,
    stream: null, ctx: null, source: null, node: null, sink: null, timer: null, ticker: null,
  };
  state.recording = rec;
  hook.recording = true;
  hook.recordedSamples = 0;
  hook.lastStored = null;
  updateUi();
  try {
    await openCapture(rec, RECORD_CHUNK_S, (samples) => pushRecorded(rec, samples), () => state.recording === rec);
    hook.recordSampleRate = rec.sampleRate;
  } catch (err) {
    if (state.recording === rec) {
      showError("client", `cannot record: ${err && err.message ? err.message : err}`);
      abortRecording("microphone unavailable");
    } else {
      releaseCapture(rec);
    }
    return;
  }
  ensureSession();
  const fields = {speaker: rec.speaker, sample_rate: rec.sampleRate, encoding: rec.encoding, channels: 1};
  if (rec.transcriptAtStart) fields.transcript = rec.transcriptAtStart;
  rec.requestId = send("audio.start", fields);
  if (rec.requestId === null) {
    abortRecording("not connected");
    return;
  }
  rec.phase = "recording";
  const maxS = limits().max_audio_s;
  if (typeof maxS === "number" && maxS > 0) {
    // Stop a little before the server limit (the server discards a turn that is over it).
    rec.timer = setTimeout(() => stopRecording(), Math.max(100, (maxS - 0.25) * 1000));
  }
  rec.ticker = setInterval(() => recordStatus(rec), 200);
  recordStatus(rec);
  updateUi();
}

function onAudioStarted() {
  const rec = state.recording;
  if (rec === null || rec.started) return;
  rec.started = true;
  for (const chunk of rec.queue) sendBinary(chunk);
  rec.queue = [];
  maybeEndTurn(rec);
}

function releaseCapture(rec) {
  clearTimeout(rec.timer);
  clearInterval(rec.ticker);
  try {
    if (rec.source) rec.source.disconnect();
    if (rec.node) rec.node.disconnect();
  } catch (err) {
    // already disconnected
  }
  if (rec.stream) for (const track of rec.stream.getTracks()) track.stop();
  if (rec.ctx && rec.ctx.state !== "closed") rec.ctx.close().catch(() => {});
}

function flushWorklet(rec) {
  if (!rec.node || !rec.node.port) return Promise.resolve();
  return new Promise((resolve) => {
    const timeout = setTimeout(resolve, 500);
    rec.onFlushed = () => {
      clearTimeout(timeout);
      resolve();
    };
    rec.node.port.postMessage("flush");
  });
}

async function stopRecording() {
  const rec = state.recording;
  if (rec === null || rec.phase !== "recording") return;
  rec.phase = "stopping";
  clearTimeout(rec.timer);
  updateUi();
  try {
    rec.source.disconnect();
  } catch (err) {
    // already disconnected
  }
  await flushWorklet(rec);
  releaseCapture(rec);
  rec.captureDone = true;
  recordStatus(rec);
  maybeEndTurn(rec);
}

function maybeEndTurn(rec) {
  if (state.recording !== rec || !rec.captureDone || !rec.started || rec.ended) return;
  rec.ended = true;
  const transcript = $("transcript").value;
  const fields = transcript && transcript !== rec.transcriptAtStart ? {transcript} : {};
  send("audio.end", fields);
  state.recording = null;
  hook.recording = false;
  $("record-status").textContent =
    `Sent ${(rec.samples / rec.sampleRate).toFixed(2)} s of audio; waiting for the server to store it…`;
  updateUi();
}

function abortRecording(reason) {
  const rec = state.recording;
  if (rec === null) return;
  state.recording = null;
  hook.recording = false;
  rec.ended = true;
  releaseCapture(rec);
  $("record-status").textContent = `Recording stopped: ${reason}`;
  updateUi();
}

function toggleRecording() {
  if (state.recording === null) startRecording();
  else if (state.recording.phase === "recording") stopRecording();
}

// ---------------------------------------------------------------------------------------------- talk mode
// One button: the microphone streams continuously (talk.start, binary chunks, talk.stop); the server finds the
// user's turns, stores them (turn.stored, no id) and answers (reply.started / reply.delta / reply.done, each
// spoken sentence a response.started / frames / response.done with the reply_id).

const replyItems = new WeakMap(); // reply entry of hook.talk.replies -> its <li> in the transcript
const MAX_TRANSCRIPT_ITEMS = 200;

function isTalkEvent(ev) {
  const type = typeof ev.type === "string" ? ev.type : "";
  if (type.startsWith("talk.") || type.startsWith("speech.") || type.startsWith("reply.")) return true;
  if (ev.reply_id !== undefined) return true;
  if (type === "turn.stored") return state.pending.get(ev.id) !== "audio.end";
  if (type === "error") {
    const answered = ev.id !== undefined ? state.pending.get(ev.id) : undefined;
    if (typeof answered === "string") return answered.startsWith("talk.");
    return state.talk !== null || hook.talk.replies.some((reply) => !reply.done);
  }
  return false;
}

function samplingFields() {
  // The sampling of the Speak panel: for `say`, and for the spoken replies of talk mode.
  const fields = {};
  const maxMs = intValue("max-audio-ms");
  if (maxMs !== undefined) fields.max_audio_ms = maxMs;
  const temperature = floatValue("temperature");
  if (temperature !== undefined) fields.temperature = temperature;
  const topK = intValue("top-k");
  if (topK !== undefined) fields.top_k = topK;
  const seed = intValue("seed");
  if (seed !== undefined) fields.seed = seed;
  const voice = $("voice").value;  // "": the server's default preset; "none": none; "preset:NAME"
  if (voice === "none") fields.voice = null;
  else if (voice.startsWith("preset:")) fields.voice = voice.slice("preset:".length);
  return fields;
}

function talkStateName() {
  const talk = state.talk;
  if (talk === null) return "off";
  if (talk.phase === "stopping") return "stopping";
  if (!talk.started) return "starting";
  if (talk.userSpeaking) return "you are speaking";
  if (state.play.sources.size > 0) return "speaking";
  const replying = hook.talk.replies.some((reply) => !reply.done);
  if (talk.awaitingTurns > 0 || talk.expectReplies > 0 || replying) return "thinking";
  return "listening";
}

function updateTalkUi() {
  const name = talkStateName();
  if (hook.talk.state !== name) {
    hook.talk.states.push(name);
    if (hook.talk.states.length > 500) hook.talk.states.shift();
  }
  hook.talk.state = name;
  const el = $("talk-state");
  const slug = name.replace(/ /g, "-");
  if (el.dataset.state !== slug) {
    el.dataset.state = slug;
    el.textContent = name;
  }
}

function talkItem(role, who) {
  const list = $("talk-transcript");
  const li = document.createElement("li");
  li.className = `entry ${role}`;
  li.dataset.role = role;
  const whoEl = document.createElement("span");
  whoEl.className = "who";
  whoEl.textContent = who;
  const text = document.createElement("span");
  text.className = "text";
  li.append(whoEl, text);
  list.append(li);
  while (list.children.length > MAX_TRANSCRIPT_ITEMS) list.firstElementChild.remove();
  list.scrollTop = list.scrollHeight;
  return li;
}

function setItemText(li, text) {
  li.querySelector(".text").textContent = text;
  const list = $("talk-transcript");
  list.scrollTop = list.scrollHeight;
}

function findReply(replyId) {
  // Reply ids start again with every talk.start: the latest entry with the id is the one meant.
  const replies = hook.talk.replies;
  for (let i = replies.length - 1; i >= 0; i--) if (replies[i].reply_id === replyId) return replies[i];
  return null;
}

function addReply(replyId) {
  const reply = {reply_id: replyId, text: "", done: false, interrupted: false, muted: false, lost: false,
    responses: [], framesReceived: 0, framesScheduled: 0, framesPlayed: 0};
  hook.talk.replies.push(reply);
  const li = talkItem("reply", "Reply");
  li.dataset.replyId = String(replyId);
  replyItems.set(reply, li);
  renderReply(reply);
  return reply;
}

function renderReply(reply) {
  const li = replyItems.get(reply);
  if (!li) return;
  li.dataset.done = reply.done ? "true" : "false";
  li.classList.toggle("live", !reply.done);
  li.classList.toggle("interrupted", reply.interrupted);
  let text = reply.text || (reply.done ? "(no reply)" : "…");
  if (reply.interrupted) text += " (interrupted)";
  else if (reply.lost) text += " (connection closed)";
  setItemText(li, text);
}

function pushTalk(talk, samples) {
  if (state.talk !== talk || talk.captureDone) return;
  const maxBytes = limits().max_message_bytes;
  const maxSamples = typeof maxBytes === "number" ? Math.max(1, Math.floor(maxBytes / 2)) : samples.length;
  for (let offset = 0; offset < samples.length; offset += maxSamples) {
    const part = samples.subarray(offset, Math.min(samples.length, offset + maxSamples));
    const chunk = encodeChunk(part, talk.encoding);
    if (talk.started) {
      if (sendBinary(chunk)) talk.samples += part.length;
    } else {
      // Held until talk.started: binary audio before it would be refused if talk mode does not start.
      talk.queue.push({chunk, samples: part.length});
      talk.queuedSamples += part.length;
      while (talk.queuedSamples > TALK_QUEUE_MAX_S * talk.sampleRate && talk.queue.length > 1) {
        talk.queuedSamples -= talk.queue.shift().samples;
      }
    }
  }
  hook.talk.sentSamples = talk.samples;
}

async function startTalk() {
  if (state.talk !== null || !isReady()) return;
  if (state.response !== null || state.recording !== null) {
    showError("client", "finish the current response or recording first");
    return;
  }
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    showError("client", "no microphone access here (needs https or localhost)");
    return;
  }
  ensurePlayback();
  const talk = {
    phase: "starting", speaker: intValue("record-speaker") ?? 1, replySpeaker: intValue("speaker") ?? 0,
    encoding: "pcm16", requestId: null, stopId: null, started: false, info: null, captureDone: false,
    queue: [], queuedSamples: 0, samples: 0, sampleRate: null,
    userSpeaking: false, awaitingTurns: 0, expectReplies: 0,
    stream: null, ctx: null, source: null, node: null, sink: null, timer: null, ticker: null,
  };
  state.talk = talk;
  Object.assign(hook.talk, {active: true, sampleRate: null, sentSamples: 0, started: null, stopped: null});
  $("talk-info").textContent = "Opening the microphone…";
  updateUi();
  try {
    await openCapture(talk, TALK_CHUNK_S, (samples) => pushTalk(talk, samples),
      () => state.talk === talk && talk.phase === "starting");
  } catch (err) {
    releaseCapture(talk);
    if (state.talk === talk) {
      const failed = talk.phase === "starting"; // else Talk was pressed again while the microphone opened
      if (failed) showError("client", `cannot open the microphone: ${err && err.message ? err.message : err}`);
      endTalk(failed ? "microphone unavailable" : "stopped");
    }
    return;
  }
  hook.talk.sampleRate = talk.sampleRate;
  ensureSession();
  talk.requestId = send("talk.start", {speaker: talk.speaker, reply_speaker: talk.replySpeaker,
    sample_rate: talk.sampleRate, encoding: talk.encoding, channels: 1, ...samplingFields()});
  if (talk.requestId === null) {
    endTalk("not connected");
    return;
  }
  $("talk-info").textContent = `Microphone at ${talk.sampleRate} Hz; starting…`;
  updateUi();
}

async function stopTalk() {
  const talk = state.talk;
  if (talk === null || talk.phase === "stopping") return;
  talk.phase = "stopping";
  updateUi();
  try {
    if (talk.source) talk.source.disconnect();
  } catch (err) {
    // already disconnected
  }
  await flushWorklet(talk); // the last of the audio goes out before talk.stop
  releaseCapture(talk);
  talk.captureDone = true;
  if (state.talk !== talk) return;
  if (talk.started) sendTalkStop(talk);
  else if (talk.requestId === null) endTalk("stopped"); // talk.start was never sent
  // else talk.start is unanswered: talk.started sends talk.stop, an error ends talk mode
}

function sendTalkStop(talk) {
  if (talk.stopId !== null) return;
  talk.stopId = send("talk.stop");
  if (talk.stopId === null) endTalk("not connected");
}

function endTalk(reason) {
  const talk = state.talk;
  if (talk === null) return;
  state.talk = null;
  talk.captureDone = true;
  talk.queue = [];
  releaseCapture(talk);
  hook.talk.active = false;
  for (const li of $("talk-transcript").querySelectorAll("li.pending")) li.remove();
  $("talk-info").textContent = reason === "stopped" ? "" : `Talk mode ended: ${reason}`;
  updateUi();
}

function toggleTalk() {
  if (state.talk === null) startTalk();
  else stopTalk();
}

function onTalkStarted(ev) {
  hook.talk.started = ev;
  const talk = state.talk;
  if (talk === null) {
    send("talk.stop"); // talk mode was given up on meanwhile: the server must not go on listening
    return;
  }
  talk.started = true;
  talk.info = ev;
  if (talk.phase === "starting") talk.phase = "on";
  for (const {chunk, samples} of talk.queue) if (sendBinary(chunk)) talk.samples += samples;
  talk.queue = [];
  talk.queuedSamples = 0;
  hook.talk.sentSamples = talk.samples;
  const vad = ev.vad || {};
  const parts = [`microphone ${talk.sampleRate} Hz`, ev.responder ? "replies on" : "no replies (listening only)"];
  if (typeof vad.end_silence_ms === "number") parts.push(`a turn ends after ${vad.end_silence_ms} ms of silence`);
  if (vad.barge_in === false) parts.push("no barge-in");
  $("talk-info").textContent = parts.join(" · ");
  if (talk.phase === "stopping" && talk.captureDone) sendTalkStop(talk);
}

function onTalkStopped(ev) {
  hook.talk.stopped = ev;
  endTalk("stopped");
}

function onSpeechStarted() {
  const talk = state.talk;
  if (talk !== null) talk.userSpeaking = true;
  const vad = talk !== null && talk.info ? talk.info.vad || {} : {};
  if (vad.barge_in === false) return; // the server lets its reply finish: so does the page
  // Barge-in: the server stops its reply; stop what is already buffered here at once, drop its late frames.
  const cut = hook.talk.replies.filter((reply) => !reply.done);
  for (const reply of cut) reply.muted = true;
  const resp = state.response;
  if (resp !== null && resp.reply) resp.cancelled = true;
  const stoppedFrames = state.play.sources.size;
  if (stoppedFrames > 0) stopPlayback();
  if (cut.length > 0 || stoppedFrames > 0) {
    hook.talk.bargeIns.push({replies: cut.map((reply) => reply.reply_id), stoppedFrames});
  }
}

function onSpeechStopped() {
  const talk = state.talk;
  if (talk === null) return;
  talk.userSpeaking = false;
  talk.awaitingTurns += 1;
  const li = talkItem("user", "You"); // filled in by its turn.stored
  li.classList.add("pending");
  setItemText(li, "…");
}

function onTalkTurnStored(ev) {
  hook.lastStored = ev;
  const turn = {...(ev.turn || {}), transcribed: ev.transcribed === true};
  hook.talk.turns.push(turn);
  const talk = state.talk;
  if (talk !== null) {
    talk.awaitingTurns = Math.max(0, talk.awaitingTurns - 1);
    if (talk.info && talk.info.responder) talk.expectReplies += 1;
  }
  const li = $("talk-transcript").querySelector("li.pending") || talkItem("user", "You");
  li.classList.remove("pending");
  li.dataset.role = "user";
  if (turn.turn_id !== undefined) li.dataset.turnId = String(turn.turn_id);
  setItemText(li, turn.text ? turn.text : "(no transcript)");
  if (state.sessionId !== null) send("history");
}

function onReplyStarted(ev) {
  const talk = state.talk;
  if (talk !== null) talk.expectReplies = Math.max(0, talk.expectReplies - 1);
  addReply(ev.reply_id);
}

function onReplyDelta(ev) {
  const reply = findReply(ev.reply_id) || addReply(ev.reply_id);
  if (typeof ev.text === "string") reply.text += ev.text;
  renderReply(reply);
}

function onReplyDone(ev) {
  const reply = findReply(ev.reply_id) || addReply(ev.reply_id);
  if (typeof ev.text === "string") reply.text = ev.text; // the whole text: it wins over the deltas
  reply.done = true;
  reply.interrupted = ev.interrupted === true;
  renderReply(reply);
}

// ---------------------------------------------------------------------------------------------- UI

function updateTextCount() {
  const n = $("text").value.length;
  const max = limits().max_text_chars;
  const el = $("text-count");
  el.textContent = typeof max === "number" ? `${n} / ${max} characters` : `${n} characters`;
  el.classList.toggle("over", typeof max === "number" && n > max);
}

function updateUi() {
  const ready = isReady();
  const connecting = state.ws !== null && !ready;
  const connectBtn = $("connect");
  connectBtn.textContent = state.ws !== null ? "Disconnect" : "Connect";
  connectBtn.setAttribute("aria-label", state.ws !== null ? "Disconnect from the server" : "Connect to the server");
  connectBtn.disabled = false;
  $("new-conversation").disabled = !ready;
  $("resume").disabled = !ready || $("resume-id").value.trim() === "";
  $("refresh-history").disabled = !ready || state.sessionId === null;
  const rec = state.recording;
  const talk = state.talk;
  $("say").disabled = !ready || state.response !== null || rec !== null || talk !== null;
  // In talk mode the replies are the server's: they are cut off by speaking (barge-in), not by Cancel.
  $("cancel").disabled = !ready || state.response === null || state.response.cancelled || talk !== null;
  const recordBtn = $("record");
  recordBtn.disabled = !ready || talk !== null || (rec === null && state.response !== null) ||
    (rec !== null && rec.phase !== "recording");
  recordBtn.textContent = rec !== null ? "Stop" : "Record";
  recordBtn.setAttribute("aria-pressed", rec !== null ? "true" : "false");
  const talkBtn = $("talk");
  talkBtn.disabled = talk === null ? !ready || state.response !== null || rec !== null : talk.phase === "stopping";
  talkBtn.textContent = talk === null ? "Talk" : talk.phase === "stopping" ? "Stopping…" : "Stop talking";
  talkBtn.setAttribute("aria-pressed", talk !== null ? "true" : "false");
  talkBtn.setAttribute("aria-label", talk === null ? "Start talking (opens the microphone)" : "Stop talking");
  updateTalkUi();
  document.body.classList.toggle("connecting", connecting);
}

function init() {
  $("connect").addEventListener("click", () => (state.ws === null ? connect() : disconnect()));
  $("new-conversation").addEventListener("click", () => {
    if (state.recording !== null || state.response !== null || state.talk !== null) {
      showError("client", "finish the current response, recording or talk first");
      return;
    }
    send("session.start");
  });
  $("resume").addEventListener("click", () => {
    const id = $("resume-id").value.trim();
    if (!id) return;
    if (state.talk !== null) {
      showError("client", "stop talking first");
      return;
    }
    send("session.start", {conversation_id: id});
  });
  $("resume-id").addEventListener("input", updateUi);
  $("resume-id").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !$("resume").disabled) $("resume").click();
  });
  $("refresh-history").addEventListener("click", () => send("history"));
  $("say").addEventListener("click", say);
  $("cancel").addEventListener("click", cancel);
  $("record").addEventListener("click", toggleRecording);
  $("talk").addEventListener("click", toggleTalk);
  $("clear-errors").addEventListener("click", () => $("errors").replaceChildren());
  $("text").addEventListener("input", updateTextCount);
  $("text").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !$("say").disabled) {
      event.preventDefault();
      say();
    }
  });
  $("volume").addEventListener("input", () => {
    if (state.play.gain) state.play.gain.gain.value = Number($("volume").value);
  });
  try {
    const last = localStorage.getItem("csm.lastConversationId");
    if (last) $("resume-id").value = last;
  } catch (err) {
    // storage disabled
  }
  renderHistory([]);
  updateTextCount();
  updateUi();
  document.body.dataset.loaded = "true";
}

init();
