// The try-it page: one speak session over the WebSocket, audio played while it streams, voices managed
// through the REST API. No build step, no dependencies.
//
// Turn-taking: the session starts with this page's contractId and asks for word marks. The page tells the server
// what it has really played (`played`, every 250 ms and when it stops), highlights the word being spoken, and,
// with "Talk over it" on, listens to the microphone: when the user speaks while a reply plays, it stops playing at
// once and sends `interrupt` for its contract; the reply then shows what was heard and strikes the rest.
import {Recorder, SpeechDetector, StreamPlayer} from "./player.js";
import {Reply} from "./reply.js";
import {wavBlob} from "./wav.js";

const RATE = 24000;           // the session's rate = the AudioContext's: no resampling in the browser
const MAX_RECORD_SECONDS = 29.5;  // under the server's 30 s limit, with room for the timer's 200 ms
const PLAYED_EVERY_MS = 250;  // how often the page tells the server how much of the reply it has played
const $ = (id) => document.getElementById(id);

function randomId() {  // crypto.randomUUID needs a secure context; getRandomValues does not
  return Array.from(crypto.getRandomValues(new Uint8Array(8)), (b) => b.toString(16).padStart(2, "0")).join("");
}

// One conversation per page load: every session of this page starts with it, and an interrupt names it.
const CONTRACT = `page-${randomId()}`;

// What the page has done, for people curious in the console and for the browser test.
const page = window.ttsPage = {
  framesReceived: 0, samplesReceived: 0, utterances: 0, completes: [], errors: [], player: null, mode: null,
  liveAppends: 0, wordTimestamps: false, marks: 0,
  turn: {
    contractId: CONTRACT, interrupts: 0, playedReports: 0,
    marks: [],  // each `marks` message of the reply shown, with where playback was when it came: {atMs, words}
    cut: null,  // the last reply cut short: {requestId, heardMs, heardText, by: "server" (its complete) or "page"}
    get mic() { return detector ? {...detector.state} : null; },
    get highlighted() { return reply.highlighted; },
  },
};

let token = localStorage.getItem("qwen-tts-token") || "";
let context = null;
let player = null;
let socket = null;
let sessionReady = null;      // resolves once the session answered `started`
let pendingStart = null;      // {resolve, reject} while a `start` awaits its answer
let configured = {};          // model, voice, language and instruction of the last `started`
let models = [];              // the served models (GET /v1/models), the default first
let voices = [];              // cloned voices and named speakers (GET /api/v1/voices)
let current = null;           // the utterance being generated: {requestId, text, sentAt, firstAudioAt, chunks, stopped}
let shown = null;             // the utterance the reply shows: `current`, and after it still while it plays
let reply = null;             // the reply's text on the page (reply.js)
let detector = null;          // the microphone's speech detector while "Talk over it" is on
let lastDownload = null;
let live = null;              // speaking as the user types: {sent: text appended so far, ready: session set up}
let recorder = null;
let recorded = null;          // the last recording, as WAV
let utteranceCounter = 0;

// -- small UI helpers ------------------------------------------------------------------------------------

function say(element, text, kind = "info") {
  element.textContent = text;
  element.dataset.kind = kind;
}

function setConnection(state) {
  const pill = $("connection");
  pill.textContent = state;
  pill.dataset.state = state;
}

function setBusy(busy) {
  $("speak").disabled = busy;
  updateStop();
}

function updateStop() {  // Stop stays useful while audio plays, after the utterance's last bytes arrived too
  $("stop").disabled = !current && !(player && player.stats.buffered > 0);
}

function fillSelect(select, options, selected) {
  select.replaceChildren(...options.map(({value, label}) => new Option(label, value, false, value === selected)));
}

function showAuth(reason) {
  $("auth").hidden = false;
  say($("message"), reason || "This server needs a token: enter it below.", "error");
  $("token").focus();
}

async function api(path, options = {}) {
  const headers = {...(options.headers || {})};
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(path, {...options, headers});
  if (response.status === 401) {
    showAuth();
    throw new Error("a token is needed");
  }
  return response;
}

// -- voices -----------------------------------------------------------------------------------------------

// -- models -----------------------------------------------------------------------------------------------

function chosenModel() {
  return models.find((m) => m.id === $("model").value) || models[0] || {kind: "base", takesInstruct: false};
}

async function loadModels() {
  const response = await api("/v1/models");
  const {data} = await response.json();
  models = data.filter((m) => !m.aliasOf && m.kind);
  const label = {base: "voice cloning", custom_voice: "named speakers", voice_design: "voice design"};
  fillSelect($("model"), models.map((m) => ({value: m.id, label: `${m.id} (${label[m.kind] || m.kind})`})),
             $("model").value || (models[0] || {}).id);
  $("model").parentElement.hidden = models.length < 2;
  $("design").hidden = !models.some((m) => m.kind === "voice_design");
}

function showModel() {  // the voice list, the instruction box and its wording follow the model's kind
  const model = chosenModel();
  const design = model.kind === "voice_design";
  $("instruct-row").hidden = !model.takesInstruct;
  $("instruct-label").textContent = design ? "Voice description" : "Instruction";
  $("instruct").placeholder = design ? "e.g. A deep, calm male voice with a slight rasp"
    : "e.g. Speak very happily, a little fast";
  $("instruct-hint").hidden = !design;
  $("instruct-hint").textContent = design ? "This model designs a new voice for each utterance from the description; "
    + "to keep one, use “Design a voice” below." : "";
  $("voice").parentElement.hidden = design;
  showVoices();
}

function showVoices(select = null) {
  const model = chosenModel();
  const usable = model.kind === "custom_voice" ? voices.filter((v) => v.kind === "speaker" && v.model === model.id)
    : voices.filter((v) => v.kind !== "speaker");
  const fallback = usable.find((v) => v.isDefault) || usable[0] || {};
  const chosen = [select, $("voice").value].find((id) => usable.some((v) => v.id === id)) || fallback.id;
  fillSelect($("voice"), usable.map((v) => ({value: v.id, label: v.isDefault && v.name.toLowerCase() !== "default"
    ? `${v.name} (default)` : v.name})), chosen);
}

async function loadVoices(select = null) {
  const response = await api("/api/v1/voices");
  voices = (await response.json()).voices;
  showVoices(select);
}

function fillLanguages(languages) {
  const options = languages.map((name) => ({value: name, label: name}));
  fillSelect($("language"), options, $("language").value || "English");
  fillSelect($("voice-language"), options, $("voice-language").value || "Auto");
  fillSelect($("design-language"), options, $("design-language").value || "English");
}

// -- the session ------------------------------------------------------------------------------------------

function startMessage() {
  const message = {type: "start", sampleRate: RATE, encoding: "pcm32f", contractId: CONTRACT, wordTimestamps: true};
  const model = chosenModel();
  if (model.id) message.model = model.id;
  if ($("voice").value && model.kind !== "voice_design") message.voice = $("voice").value;
  message.instruct = model.takesInstruct ? $("instruct").value.trim() : "";
  if ($("language").value) message.language = $("language").value;
  if (token) message.authToken = token;
  return message;
}

function awaitStarted() {
  return new Promise((resolve, reject) => { pendingStart = {resolve, reject}; });
}

function connect() {
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/api/v1/speak`;
  const ws = socket = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  setConnection("connecting…");
  sessionReady = awaitStarted();
  sessionReady.catch(() => {});
  // A replaced socket (a reconnect, a new token) must not touch the state of the one that replaced it.
  ws.onopen = () => ws.send(JSON.stringify(startMessage()));  // first: it may carry the token
  ws.onmessage = ({data}) => {
    if (ws !== socket) return;
    if (data instanceof ArrayBuffer) onAudio(new Float32Array(data));
    else onMessage(JSON.parse(data));
  };
  ws.onclose = ({code}) => {
    if (ws !== socket) return;
    setConnection("disconnected");
    if (pendingStart) pendingStart.reject(new Error(`the session closed (${code})`));
    pendingStart = null;
    if (current) finish(null);
    socket = null;
  };
  return sessionReady;
}

async function ensureSession() {
  if (!socket || socket.readyState > WebSocket.OPEN) await connect();
  else await sessionReady;
  const wanted = startMessage();
  if (wanted.voice !== configured.voice || wanted.language !== configured.language
      || (wanted.model && wanted.model !== configured.model) || (wanted.instruct || null) !== (configured.instruct || null)) {
    sessionReady = awaitStarted();
    socket.send(JSON.stringify(wanted));
    await sessionReady;
  }
}

function onMessage(message) {
  switch (message.type) {
    case "ready":
      setConnection("connected");
      fillLanguages(message.capabilities.languages);
      break;
    case "started":
      configured = {voice: message.voice, language: message.language, wordTimestamps: message.wordTimestamps,
                    model: message.model, instruct: message.instruct};
      page.wordTimestamps = Boolean(message.wordTimestamps);
      if (pendingStart) pendingStart.resolve(message);
      pendingStart = null;
      break;
    case "complete":
      finish(message);
      break;
    case "marks":
      if (shown && message.requestId === shown.requestId && !shown.stopped) {
        page.marks += message.words.length;
        page.turn.marks.push({atMs: shown.firstAudioAt === null ? 0 : player.positionMs(), words: message.words});
        reply.addMarks(message.words);
      }
      break;
    case "error":
      page.errors.push(message);
      say($("message"), `${message.code}: ${message.message}`, message.recoverable ? "warning" : "error");
      if (message.code === "UNAUTHORIZED") showAuth(`${message.message}: enter a token below.`);
      if (message.code === "VOICE_NOT_FOUND") {  // a warning: the session goes on with another voice
        loadVoices().catch(() => {});
      } else if (pendingStart && !message.requestId) {
        pendingStart.reject(new Error(message.message));
        pendingStart = null;
      }
      // A speak refused before it started (model loading, text too long, too busy) gets no `complete`.
      if (current && message.requestId === current.requestId && current.firstAudioAt === null) finish(null);
      break;
  }
}

function onAudio(samples) {
  page.framesReceived += 1;
  page.samplesReceived += samples.length;
  if (!current || current.stopped) return;  // audio of an utterance stopped a moment ago
  if (current.firstAudioAt === null) {
    current.firstAudioAt = performance.now();
    $("ttfa").textContent = `${Math.round(current.firstAudioAt - current.sentAt)} ms`;
  }
  current.chunks.push(samples.slice());  // the player takes ownership of `samples`
  player.push(samples);
}

function finish(complete) {
  const utterance = current;
  current = null;
  setBusy(false);
  player.end();
  if (!utterance) return;
  const seconds = utterance.chunks.reduce((n, c) => n + c.length, 0) / RATE;
  $("audio-seconds").textContent = `${seconds.toFixed(2)} s`;
  showStalls(utterance);
  if (complete && complete.interrupted && !utterance.stopped) {
    // interrupted from elsewhere (another session of this conversation, or its REST route): silent here too
    utterance.stopped = true;
    player.clear();
  }
  if (complete) {
    page.utterances += 1;
    page.completes.push(complete);
    const wall = (performance.now() - utterance.sentAt) / 1000;
    $("rtf").textContent = seconds ? (wall / seconds).toFixed(2) : "–";
    $("rtf").title = "generation time / audio duration: below 1 is faster than real time";
    if (complete.firstAudioMs !== null) $("ttfa").title = `server: ${complete.firstAudioMs} ms`;
    $("stalls").title = `this page's player; the server's view of a real-time listener: ${complete.underruns} ` +
      `(${complete.stallMs} ms)`;
    say($("message"), complete.cancelled ? "Stopped." : `Done: ${complete.charactersProcessed} characters.`);
    if (complete.cancelled && complete.heardMs !== undefined) {
      showCut(utterance, complete.heardText === undefined ? null : complete.heardText, complete.heardMs,
              Boolean(complete.interrupted), "server");
    } else if (utterance.cutAtMs !== undefined) {  // the page stopped it just as its generation ended
      showCut(utterance, reply.heardTextAt(utterance.cutAtMs, configured.wordTimestamps), utterance.cutAtMs,
              utterance.interrupting, "page");
    }
  }
  if (seconds) {
    if (lastDownload) URL.revokeObjectURL(lastDownload);
    lastDownload = URL.createObjectURL(wavBlob(utterance.chunks, RATE));
    $("download").href = lastDownload;
    $("download").classList.remove("disabled");
  }
}

async function ensureAudio() {
  if (!context) {
    context = new AudioContext({sampleRate: RATE});
    player = page.player = await new StreamPlayer(context).init();
    page.mode = player.mode;
  }
  if (context.state !== "running") await context.resume();
}

async function speak() {
  const text = $("text").value.trim();
  if (!text) {
    say($("message"), "Type something to say first.", "warning");
    return;
  }
  setBusy(true);
  say($("message"), "");
  try {
    await ensureAudio();
    await ensureSession();
  } catch (error) {
    setBusy(false);
    say($("message"), `Cannot start: ${error.message}`, "error");
    return;
  }
  beginUtterance(text);
  socket.send(JSON.stringify({type: "speak", text, requestId: current.requestId}));
}

function beginUtterance(text) {
  player.clear();
  for (const id of ["ttfa", "rtf", "audio-seconds", "stalls"]) $(id).textContent = "…";
  shown = current = {requestId: `page-${++utteranceCounter}`, text, sentAt: performance.now(), firstAudioAt: null,
                     chunks: [], stopped: false, stalls: player.stats.stalls,
                     stalledSamples: player.stats.stalledSamples};
  reply.begin(text);
}

// Speak as I type: text added at the end of the box goes out as `append`s of one continuous utterance (spoken
// word by word while it is written); Ctrl+Enter, or unticking the box, ends it.
async function typed() {
  if (!$("live").checked || !$("text").value) return;
  if (!live) {
    const opening = live = {sent: "", ready: null};
    opening.ready = (async () => {
      await ensureAudio();
      await ensureSession();
      setBusy(true);
      say($("message"), "Speaking as you type: Ctrl+Enter ends the utterance.");
      beginUtterance("");
    })();
  }
  const session = live;
  try {
    await session.ready;
  } catch (error) {
    if (live === session) live = null;
    say($("message"), `Cannot start: ${error.message}`, "error");
    return;
  }
  if (live !== session) return;
  const text = $("text").value;
  if (!text.startsWith(session.sent)) {  // an edit before the end: what was sent is spoken as it was
    say($("message"), "Only text added at the end is spoken while typing.", "warning");
    session.sent = text;
    return;
  }
  const piece = text.slice(session.sent.length);
  if (!piece) return;
  const opens = !session.sent;
  session.sent = text;
  page.liveAppends += 1;
  current.text += piece;  // the text the server speaks (and counts characters of), as sent
  reply.setText(current.text);
  socket.send(JSON.stringify(opens ? {type: "append", text: piece, requestId: current.requestId, textMode: "continuous"}
                                   : {type: "append", text: piece}));
}

function endTyped() {
  const session = live;
  live = null;
  if (session && session.sent && socket && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify({type: "end"}));
  }
}

function stop() {
  cutShort(false);
  updateStop();
}

// -- turn-taking ------------------------------------------------------------------------------------------

/** Whether the reply is being heard now: its audio started, it is not stopped, and some is still to play. */
function replyPlaying() {
  return Boolean(shown && !shown.stopped && shown.firstAudioAt !== null &&
                 (shown === current || player.stats.buffered > 0));
}

/** Stop the reply now (Stop, or the user talking over it: `interrupting`): silence the player, tell the server
 * what was played, then cancel or interrupt the conversation. The server answers with what was heard; a reply
 * whose generation had already ended is cut here, from the page's own playback position and word marks. */
function cutShort(interrupting) {
  const utterance = shown && !shown.stopped && (shown === current || replyPlaying()) ? shown : null;
  const ms = utterance && utterance.firstAudioAt !== null ? Math.round(player.positionMs()) : 0;
  if (current) current.stopped = true;
  if (player) player.clear();
  if (utterance) Object.assign(utterance, {stopped: true, cutAtMs: ms, interrupting});
  if (socket && socket.readyState === WebSocket.OPEN) {
    if (current && current.firstAudioAt !== null) reportPlayed(current, ms);
    socket.send(JSON.stringify(interrupting ? {type: "interrupt", contractId: CONTRACT} : {type: "cancel"}));
  }
  if (interrupting) page.turn.interrupts += 1;
  if (utterance && utterance !== current) {
    showCut(utterance, reply.heardTextAt(ms, configured.wordTimestamps), ms, interrupting, "page");
  }
}

function reportPlayed(utterance, ms) {
  socket.send(JSON.stringify({type: "played", requestId: utterance.requestId, ms}));
  utterance.playedMs = ms;
  page.turn.playedReports += 1;
}

/** Every PLAYED_EVERY_MS while the server still generates the reply: how much of it has really been played. */
function reportPlaying() {
  const utterance = current;
  if (!utterance || utterance !== shown || utterance.stopped || utterance.firstAudioAt === null) return;
  if (!socket || socket.readyState !== WebSocket.OPEN) return;
  const ms = Math.round(player.positionMs());
  if (ms !== utterance.playedMs) reportPlayed(utterance, ms);
}

function showCut(utterance, heardText, heardMs, interrupted, by) {
  if (utterance !== shown) return;
  page.turn.cut = {requestId: utterance.requestId, heardMs, heardText, by};
  reply.stopped(heardText, heardMs);
  const what = heardText !== null ? `${heardText.trim().split(/\s+/).filter(Boolean).length} words` : `${heardMs} ms`;
  say($("message"), `${interrupted ? "Interrupted" : "Stopped"}: heard ${what}.`);
}

function onSpeech(state) {
  showTalkState();
  if (state.speaking && $("talk-over").checked && replyPlaying()) cutShort(true);
}

async function toggleTalkOver() {
  const on = $("talk-over").checked;
  if (!on) {
    if (detector) detector.stop();
    detector = null;
    showTalkState();
    return;
  }
  if (detector) return;
  const starting = detector = new SpeechDetector(onSpeech);
  showTalkState();
  try {
    await starting.start();
  } catch (error) {
    if (detector === starting) detector = null;
    $("talk-over").checked = false;
    say($("message"), `Cannot listen: ${error.message}`, "error");
  }
  if (detector !== starting) starting.stop();  // switched off (and maybe on again) meanwhile
  showTalkState();
}

function showTalkState() {
  const state = detector ? detector.state : null;
  const text = !state ? "off" : !state.listening ? "opening the microphone…"
    : !state.calibrated ? "listening (measuring the room: stay quiet)…" : "listening";
  if ($("talk-state").textContent !== text) $("talk-state").textContent = text;  // aria-live: changes only
  $("talk-meter").hidden = !state || !state.listening;
  $("talk-dot").dataset.speaking = String(Boolean(state && state.speaking));
}

function showStalls(utterance) {
  // What this page's player heard of the utterance: how often it ran dry while audio was still coming.
  if (!utterance || utterance.firstAudioAt === null) return;
  const stalls = player.stats.stalls - utterance.stalls;
  const ms = Math.round((player.stats.stalledSamples - utterance.stalledSamples) / RATE * 1000);
  $("stalls").textContent = stalls ? `${stalls} (${ms} ms)` : "none";
}

function drawMeter() {
  updateStop();
  showStalls(current);
  if (shown && !shown.stopped && shown.firstAudioAt !== null) {
    if (replyPlaying()) reply.at(player.positionMs());
    else if (shown !== current) reply.done();
  }
  if (detector && detector.state.speaking && $("talk-over").checked && replyPlaying()) cutShort(true);
  if (detector && detector.state.listening) {
    const {level, threshold} = detector.state;
    $("talk-level").style.width = `${Math.min(100, threshold ? 50 * level / threshold : 0)}%`;  // half: threshold
    showTalkState();
  }
  const buffered = player ? player.stats.buffered / RATE : 0;
  $("buffered").style.width = `${Math.min(100, buffered * 10)}%`;
  $("buffered").title = `${buffered.toFixed(1)} s buffered`;
  requestAnimationFrame(drawMeter);
}

// -- adding a voice ---------------------------------------------------------------------------------------

async function toggleRecording() {
  const button = $("record");
  if (recorder) {
    const sampleRate = recorder.sampleRate;
    const chunks = recorder.stop();
    recorded = wavBlob(chunks, sampleRate);
    $("recorded").textContent = `recorded ${recorder.seconds.toFixed(1)} s`;
    recorder = null;
    button.textContent = "● Record";
    button.classList.remove("recording");
    return;
  }
  try {
    recorder = new Recorder();
    await recorder.start();
  } catch (error) {
    recorder = null;
    say($("voice-message"), `Cannot record: ${error.message}`, "error");
    return;
  }
  $("voice-file").value = "";
  button.textContent = "■ Stop recording";
  button.classList.add("recording");
  const tick = () => {
    if (!recorder) return;
    $("recorded").textContent = `recording… ${recorder.seconds.toFixed(1)} s`;
    if (recorder.seconds >= MAX_RECORD_SECONDS) toggleRecording();
    else setTimeout(tick, 200);
  };
  tick();
}

async function addVoice(event) {
  event.preventDefault();
  const file = $("voice-file").files[0];
  const audio = file || recorded;
  if (!audio) {
    say($("voice-message"), "Choose an audio file or record a clip first.", "warning");
    return;
  }
  const form = new FormData();
  form.append("audio", audio, file ? file.name : "recording.wav");
  form.append("name", $("voice-name").value.trim());
  form.append("language", $("voice-language").value);
  if ($("voice-transcript").value.trim()) form.append("transcript", $("voice-transcript").value.trim());
  $("upload").disabled = true;
  say($("voice-message"), "Computing the voice prompt…");
  try {
    const response = await api("/api/v1/voices", {method: "POST", body: form});
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || response.statusText);
    if (chosenModel().kind !== "base") {  // a cloned voice speaks on the Base models
      const base = models.find((m) => m.kind === "base");
      if (base) { $("model").value = base.id; showModel(); }
    }
    await loadVoices(body.id);
    say($("voice-message"), `Added "${body.name}": it is selected above.`, "success");
    $("voice-form").reset();
    recorded = null;
    $("recorded").textContent = "";
  } catch (error) {
    say($("voice-message"), `Not added: ${error.message}`, "error");
  } finally {
    $("upload").disabled = false;
  }
}

// -- wiring -----------------------------------------------------------------------------------------------

// -- designing a voice ------------------------------------------------------------------------------------

async function designVoice(event) {
  event.preventDefault();
  $("design-button").disabled = true;
  say($("design-message"), "Designing: the VoiceDesign model speaks the sample, then its prompt is computed…");
  try {
    const response = await api("/api/v1/voices/design", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({description: $("design-description").value.trim(), text: $("design-text").value.trim(),
                            name: $("design-name").value.trim(), language: $("design-language").value}),
    });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || response.statusText);
    page.designed = body;
    const base = models.find((m) => m.kind === "base");
    if (base) $("model").value = base.id;
    showModel();
    await loadVoices(body.id);
    say($("design-message"), `Designed "${body.name}": it is selected above, on ${base ? base.id : "a Base model"}.`,
        "success");
  } catch (error) {
    say($("design-message"), `Not designed: ${error.message}`, "error");
  } finally {
    $("design-button").disabled = false;
  }
}

async function load() {
  try {
    await loadModels();
    await loadVoices();
    showModel();
    if (socket) socket.close();
    await connect();
    $("speak").disabled = false;
  } catch (error) {
    say($("message"), `Not connected: ${error.message}`, "error");
  }
}

function wire() {
  reply = new Reply($("reply"));
  $("contract").textContent = CONTRACT;
  $("talk-over").addEventListener("change", toggleTalkOver);
  if (!SpeechDetector.available()) {
    $("talk-over").disabled = true;
    $("talk-over").parentElement.title = "Listening to the microphone needs https (or localhost)";
  }
  setInterval(reportPlaying, PLAYED_EVERY_MS);
  $("speak").addEventListener("click", speak);
  $("stop").addEventListener("click", stop);
  $("text").addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || !(event.ctrlKey || event.metaKey)) return;
    event.preventDefault();
    if ($("live").checked) endTyped();
    else speak();
  });
  $("text").addEventListener("input", () => typed());
  $("live").addEventListener("change", () => {
    $("speak").hidden = $("live").checked;
    if (!$("live").checked) endTyped();
  });
  $("voice-form").addEventListener("submit", addVoice);
  $("design-form").addEventListener("submit", designVoice);
  $("model").addEventListener("change", showModel);
  $("record").addEventListener("click", toggleRecording);
  $("download").addEventListener("click", (event) => {
    if ($("download").classList.contains("disabled")) event.preventDefault();
  });
  $("auth-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    token = $("token").value.trim();
    localStorage.setItem("qwen-tts-token", token);
    $("auth").hidden = true;
    say($("message"), "");
    await load();
  });
  if (!window.isSecureContext) {
    $("record").disabled = true;
    $("record").title = "Recording needs https (or localhost)";
  }
  requestAnimationFrame(drawMeter);
}

wire();
load();
