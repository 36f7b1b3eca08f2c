"""The page ``mm serve`` shows at ``GET /demo``: ask the model aloud and hear its answer.

One self-contained HTML page (no scripts or styles from elsewhere, so it works offline). The user
records from the microphone (``MediaRecorder``) or picks an audio file, optionally types a text
prompt (such as "Repeat after me in English." or "Translate the following sentence into
French."), and the page sends one Chat Completions request to the same server: an ``input_audio``
part and ``modalities: ["text", "audio"]``. It shows the answer and plays the spoken answer from
the message's ``audio`` field.

Browsers record webm/ogg and users pick any format, while ``input_audio`` takes wav or mp3 (as
OpenAI's does), so the page decodes the audio with the Web Audio API, renders it to mono 16 kHz
(the speech encoder's rate) with an ``OfflineAudioContext``, and sends 16-bit PCM WAV. A 16 kHz
mono WAV passes through unchanged, sample for sample.
"""

from __future__ import annotations

__all__ = ["DEMO_PAGE", "demo_page"]

DEMO_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mm: ask aloud</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem; }
  fieldset { border: 1px solid #ccc; border-radius: 6px; margin: 1rem 0; }
  button { font-size: 1rem; padding: .4rem .9rem; margin-right: .5rem; }
  #answer { white-space: pre-wrap; font-size: 1.2rem; min-height: 1.5rem; }
  #error { color: #b00; white-space: pre-wrap; }
  #status { color: #555; }
</style>
</head>
<body>
<h1>Ask aloud</h1>
<p>Model: <code id="model">__MODEL_ID__</code>. Speak a question, or pick a recording; the answer is
shown and spoken.</p>
<fieldset>
  <legend>Speech</legend>
  <button id="record" type="button">&#9679; Record</button>
  <button id="stop" type="button" disabled>&#9632; Stop</button>
  <label>or a file: <input id="file" type="file" accept="audio/*,.wav,.mp3,.flac,.ogg,.webm,.m4a"></label>
</fieldset>
<fieldset>
  <legend>Text before the speech (optional)</legend>
  <input id="prompt" type="text" size="40" list="prompts" placeholder="e.g. Repeat after me in English.">
  <datalist id="prompts">
    <option value="Repeat after me in English."></option>
    <option value="Translate the following sentence into French."></option>
  </datalist>
  <label><input id="speak" type="checkbox" checked> say the answer</label>
</fieldset>
<p id="status"></p>
<h2>Answer</h2>
<div id="answer"></div>
<audio id="answer-audio" controls></audio>
<div id="error"></div>
<script>
"use strict";
const RATE = 16000;
const $ = (id) => document.getElementById(id);
const status = (text) => { $("status").textContent = text; };

function toWav(samples) {  // Float32Array in [-1, 1] -> 16-bit PCM mono WAV bytes
  const buf = new ArrayBuffer(44 + 2 * samples.length);
  const v = new DataView(buf);
  const str = (o, s) => { for (let i = 0; i < s.length; i++) v.setUint8(o + i, s.charCodeAt(i)); };
  str(0, "RIFF"); v.setUint32(4, 36 + 2 * samples.length, true); str(8, "WAVE");
  str(12, "fmt "); v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
  v.setUint32(24, RATE, true); v.setUint32(28, 2 * RATE, true); v.setUint16(32, 2, true);
  v.setUint16(34, 16, true); str(36, "data"); v.setUint32(40, 2 * samples.length, true);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.round(samples[i] * 32768);
    v.setInt16(44 + 2 * i, Math.max(-32768, Math.min(32767, s)), true);
  }
  return new Uint8Array(buf);
}

function base64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

async function toMono16k(arrayBuffer) {  // any format the browser decodes -> mono 16 kHz samples
  const decoded = await new OfflineAudioContext(1, 1, RATE).decodeAudioData(arrayBuffer);
  const length = Math.max(1, Math.ceil(decoded.duration * RATE));
  const ctx = new OfflineAudioContext(1, length, RATE);
  const src = ctx.createBufferSource();
  src.buffer = decoded;
  src.connect(ctx.destination);
  src.start();
  return (await ctx.startRendering()).getChannelData(0);
}

async function ask(blob) {
  $("error").textContent = ""; $("answer").textContent = "";
  const player = $("answer-audio");
  player.removeAttribute("src");
  try {
    status("decoding the audio…");
    const wav = toWav(await toMono16k(await blob.arrayBuffer()));
    const content = [];
    const prompt = $("prompt").value.trim();
    if (prompt) content.push({type: "text", text: prompt});
    content.push({type: "input_audio", input_audio: {data: base64(wav), format: "wav"}});
    const body = {messages: [{role: "user", content}]};  // new tokens: the server's limit
    if ($("speak").checked) { body.modalities = ["text", "audio"]; body.audio = {voice: "heart", format: "wav"}; }
    status("asking the model…");
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
    });
    const reply = await response.json();
    if (!response.ok) throw new Error(reply.error ? reply.error.message : response.statusText);
    const message = reply.choices[0].message;
    $("answer").textContent = message.content;
    if (message.audio) {
      player.src = "data:audio/wav;base64," + message.audio.data;
      player.play().catch(() => {});  // autoplay may be refused; the controls still play it
    }
    status("");
  } catch (e) {
    status("");
    $("error").textContent = String(e.message || e);
  }
}

$("file").addEventListener("change", () => { const f = $("file").files[0]; if (f) ask(f); });

let recorder = null;
$("record").addEventListener("click", async () => {
  try {
    const stream = await navigator.mediaDevices.getUserMedia({audio: true});
    const chunks = [];
    recorder = new MediaRecorder(stream);
    recorder.ondataavailable = (e) => { if (e.data.size) chunks.push(e.data); };
    recorder.onstop = () => {
      stream.getTracks().forEach((t) => t.stop());
      $("record").disabled = false; $("stop").disabled = true;
      ask(new Blob(chunks, {type: recorder.mimeType}));
    };
    recorder.start();
    $("record").disabled = true; $("stop").disabled = false;
    status("recording… press Stop when done");
  } catch (e) {
    $("error").textContent = "cannot record: " + (e.message || e);
  }
});
$("stop").addEventListener("click", () => { if (recorder && recorder.state === "recording") recorder.stop(); });
</script>
</body>
</html>
"""
"""The page; ``__MODEL_ID__`` is replaced by the served model's id."""


def demo_page(model_id: str) -> str:
    """The page for the model ``model_id`` (HTML-escaped)."""
    import html

    return DEMO_PAGE.replace("__MODEL_ID__", html.escape(model_id))
