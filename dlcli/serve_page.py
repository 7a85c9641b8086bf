"""The page `dlcli serve` answers at GET /: one self-contained HTML file (inline CSS and JS, nothing fetched but
/v1/predict) to try a run by hand: a canvas to draw on and a file picker for image runs, a text box for text runs,
a form of the stored features for table runs, a JSON box for arrays; the answer as top-k bars and the latency."""
import html
import json

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dlcli serve: __TITLE__</title>
<style>
body{font:15px system-ui,sans-serif;margin:0 auto;max-width:34rem;padding:1rem;color:#222}
h1{font-size:1.2rem;margin:.2rem 0}.sub{color:#666;font-size:.85rem;margin-bottom:1rem}
canvas{background:#000;touch-action:none;width:100%;max-width:280px;aspect-ratio:1;border-radius:6px;display:block}
textarea,input,select{font:inherit;width:100%;box-sizing:border-box;padding:.3rem;margin:.15rem 0}
label{display:block;font-size:.85rem;margin-top:.4rem}button{font:inherit;padding:.4rem 1rem;margin:.5rem .5rem 0 0}
.bar{display:flex;align-items:center;gap:.5rem;margin:.25rem 0}.bar span{width:6rem;overflow:hidden;text-overflow:ellipsis}
.bar div{background:#3b82f6;height:1.1rem;border-radius:3px}.bar b{font-weight:normal;font-size:.85rem}
#error{color:#b91c1c}#latency{color:#666;font-size:.85rem}#key{display:none}
</style></head><body>
<h1>__TITLE__</h1><div class="sub">__SUBTITLE__</div>
<form id="form" onsubmit="event.preventDefault();send()">
<div id="inputs"></div>
<input id="key" type="password" placeholder="API key (X-API-Key)">
<button type="submit" id="predict">Predict</button><button type="button" id="clear">Clear</button>
</form>
<p id="error"></p><div id="bars"></div><p id="latency"></p>
<script>
const INFO = __INFO__;
const box = document.getElementById("inputs");
let instance = null;  // returns the instance the form describes

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  Object.assign(e, attrs || {});
  if (text !== undefined) e.textContent = text;
  return e;
}

if (INFO.kind === "image") {
  const canvas = el("canvas", {id: "canvas", width: 280, height: 280});
  const picker = el("input", {id: "file", type: "file", accept: "image/png,image/jpeg"});
  const invert = el("input", {id: "invert", type: "checkbox"});
  box.append(canvas, el("label", {}, "or an image file (PNG/JPEG)"), picker);
  const inv = el("label", {}, " invert (dark writing on a light background)"); inv.prepend(invert); box.append(inv);
  const ctx = canvas.getContext("2d");
  const blank = () => { ctx.fillStyle = "#000"; ctx.fillRect(0, 0, 280, 280); };
  blank();
  let drawing = false, last = null;
  const at = e => { const r = canvas.getBoundingClientRect();
    return [(e.clientX - r.left) * 280 / r.width, (e.clientY - r.top) * 280 / r.height]; };
  canvas.addEventListener("pointerdown", e => { drawing = true; last = at(e); canvas.setPointerCapture(e.pointerId); });
  canvas.addEventListener("pointermove", e => { if (!drawing) return; const p = at(e);
    ctx.strokeStyle = "#fff"; ctx.lineWidth = 22; ctx.lineCap = "round";
    ctx.beginPath(); ctx.moveTo(...last); ctx.lineTo(...p); ctx.stroke(); last = p; });
  canvas.addEventListener("pointerup", () => { drawing = false; send(); });
  picker.addEventListener("change", () => {
    const file = picker.files[0]; if (!file) return;
    const img = new Image();
    img.onload = () => { blank(); ctx.drawImage(img, 0, 0, 280, 280); send(); };
    img.src = URL.createObjectURL(file);
  });
  document.getElementById("clear").onclick = () => { blank(); picker.value = ""; show(null); };
  instance = () => canvas.toDataURL("image/png").split(",")[1];
} else if (INFO.kind === "text") {
  const text = el("textarea", {id: "text", rows: 6, placeholder: "Text to classify"});
  box.append(text);
  document.getElementById("clear").onclick = () => { text.value = ""; show(null); };
  instance = () => text.value;
} else if (INFO.kind === "table") {
  const fields = {};
  for (const f of INFO.features || []) {
    box.append(el("label", {htmlFor: "f-" + f.name}, f.name + " (" + f.preprocessing + ")"));
    let input;
    if (f.values) {
      input = el("select", {id: "f-" + f.name});
      for (const v of f.values) input.append(el("option", {value: v}, String(v)));
    } else input = el("input", {id: "f-" + f.name, placeholder: f.type});
    box.append(input); fields[f.name] = input;
  }
  document.getElementById("clear").onclick = () => { for (const i of Object.values(fields)) i.value = ""; show(null); };
  instance = () => Object.fromEntries(Object.entries(fields).map(([k, i]) => [k, i.value === "" ? null : i.value]));
} else {
  const shape = INFO.inputs[0].shape;
  const text = el("textarea", {id: "array", rows: 6, placeholder: "JSON array of shape " + JSON.stringify(shape)});
  box.append(text);
  document.getElementById("clear").onclick = () => { text.value = ""; show(null); };
  instance = () => JSON.parse(text.value);
}

function show(answer, ms) {
  const bars = document.getElementById("bars"); bars.replaceChildren();
  document.getElementById("latency").textContent = ms === undefined ? "" : "latency " + ms.toFixed(1) + " ms";
  if (!answer) return;
  const heads = answer.outputs ? Object.entries(answer.outputs) : [["", answer]];
  for (const [name, out] of heads) {
    if (name) bars.append(el("h3", {}, name));
    if (!out.top_k) { bars.append(el("pre", {className: "values"}, JSON.stringify(out.values))); continue; }
    for (const t of out.top_k) {
      const row = el("div", {className: "bar"});
      row.append(el("span", {title: t.label}, t.label),
                 el("div", {style: "width:" + Math.max(1, 60 * t.probability) + "%"}),
                 el("b", {}, (100 * t.probability).toFixed(1) + "%"));
      bars.append(row);
    }
  }
}

async function send() {
  const error = document.getElementById("error"); error.textContent = "";
  let body;
  try { body = {instances: [instance()], top_k: 5}; } catch (e) { error.textContent = String(e); return; }
  const invert = document.getElementById("invert");
  if (invert && invert.checked) body.invert = true;
  const headers = {"Content-Type": "application/json"};
  const key = document.getElementById("key");
  if (key.value) headers["X-API-Key"] = key.value;
  const started = performance.now();
  const response = await fetch("v1/predict", {method: "POST", headers, body: JSON.stringify(body)});
  const answer = await response.json();
  if (response.status === 401) key.style.display = "block";
  if (!response.ok) { error.textContent = answer.error || response.statusText; show(null); return; }
  show(answer.predictions[0], performance.now() - started);
}
</script></body></html>
"""


def render(info: dict) -> str:
    """The page for a served run; `info` is GET /v1/model's answer (embedded, so the page needs no second call)."""
    classes = next((o["classes"] for o in info["outputs"] if o["classes"]), None)
    subtitle = (f"{info['kind']} input {info['inputs'][0]['shape']}"
                + (f", {len(classes)} classes" if classes else "") + f" · dlcli {info['dlcli_version']}")
    # </script> inside the JSON would end the script element early: escape every '<'
    return (PAGE.replace("__TITLE__", html.escape(info["name"])).replace("__SUBTITLE__", html.escape(subtitle))
            .replace("__INFO__", json.dumps(info).replace("<", "\\u003c")))
