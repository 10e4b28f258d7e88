// One or more H×W RGBA images drawn enlarged (scale CSS pixels per image pixel, no smoothing), in a grid of
// `columns` images per row, `gap` CSS pixels apart.
// When editable, a left-button drag previews the brush and, on release (or when the pointer leaves), sends
// {type: "stroke", points: [[x, y], ...], size: [width, height]} in CSS pixels from the canvas' top-left
// corner; the kernel maps them to pixels (sosvae_lib.editing.screen_to_pixel) and sends back the new image.
function render({ model, el }) {
  const canvas = document.createElement("canvas");
  canvas.className = "sosvae-canvas";
  el.appendChild(canvas);
  const off = document.createElement("canvas");
  let version = 0;
  let points = null;

  function geometry() {
    const n = Math.max(1, model.get("count")), cols = Math.max(1, Math.min(n, model.get("columns")));
    return { h: model.get("height"), w: model.get("width"), n, cols, rows: Math.ceil(n / cols),
             s: model.get("scale"), gap: model.get("gap") };
  }
  function draw() {
    const { h, w, n, cols, rows, s, gap } = geometry();
    const W = cols * w * s + (cols - 1) * gap, H = rows * h * s + (rows - 1) * gap;
    if (canvas.width !== W || canvas.height !== H) { canvas.width = W; canvas.height = H; }
    canvas.style.width = `${W}px`; canvas.style.height = `${H}px`;
    canvas.dataset.editable = String(model.get("editable"));
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, W, H);
    const dv = model.get("rgba");
    if (dv && dv.byteLength === n * h * w * 4) {
      const bytes = new Uint8ClampedArray(dv.buffer, dv.byteOffset, dv.byteLength);
      off.width = w; off.height = h;
      const octx = off.getContext("2d");
      ctx.imageSmoothingEnabled = false;
      for (let k = 0; k < n; k++) {
        octx.putImageData(new ImageData(bytes.slice(k * h * w * 4, (k + 1) * h * w * 4), w, h), 0, 0);
        ctx.drawImage(off, (k % cols) * (w * s + gap), Math.floor(k / cols) * (h * s + gap), w * s, h * s);
      }
    }
    outline();
    version += 1;
    canvas.dataset.version = String(version);
  }
  function outline() {  // the border of the painted pixels (`mask`, H·W bytes), over the first image
    const { h, w, s } = geometry();
    const mv = model.get("mask");
    if (!mv || mv.byteLength !== h * w) return;
    const m = new Uint8Array(mv.buffer, mv.byteOffset, mv.byteLength);
    const on = (i, j) => i >= 0 && j >= 0 && i < h && j < w && m[i * w + j] !== 0;
    const ctx = canvas.getContext("2d");
    ctx.strokeStyle = model.get("outline");
    ctx.lineWidth = 1;
    ctx.beginPath();
    for (let i = 0; i < h; i++) for (let j = 0; j < w; j++) {
      if (!on(i, j)) continue;
      const x = j * s, y = i * s;
      if (!on(i - 1, j)) { ctx.moveTo(x, y + 0.5); ctx.lineTo(x + s, y + 0.5); }
      if (!on(i + 1, j)) { ctx.moveTo(x, y + s - 0.5); ctx.lineTo(x + s, y + s - 0.5); }
      if (!on(i, j - 1)) { ctx.moveTo(x + 0.5, y); ctx.lineTo(x + 0.5, y + s); }
      if (!on(i, j + 1)) { ctx.moveTo(x + s - 0.5, y); ctx.lineTo(x + s - 0.5, y + s); }
    }
    ctx.stroke();
  }
  function at(e) {
    const r = canvas.getBoundingClientRect();
    return [e.clientX - r.left, e.clientY - r.top, r.width, r.height];
  }
  function preview(x, y, rw, rh) {  // the brush square under the pointer (the kernel's mapping: floor(x·W/width))
    const { h, w } = geometry();
    const bw = model.get("brush_width"), lo = -Math.floor((bw - 1) / 2);
    const col = Math.floor(x * w / rw), row = Math.floor(y * h / rh);
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = model.get("brush");
    const sx = canvas.width / w, sy = canvas.height / h;
    ctx.fillRect((col + lo) * sx, (row + lo) * sy, bw * sx, bw * sy);
  }
  function add(e) {
    const [x, y, rw, rh] = at(e);
    if (x < 0 || y < 0 || x >= rw || y >= rh) return;
    points.push([x, y]);
    preview(x, y, rw, rh);
  }
  function finish() {
    if (points === null) return;
    const r = canvas.getBoundingClientRect();
    if (points.length) model.send({ type: "stroke", points, size: [r.width, r.height] });
    points = null;
  }
  const down = (e) => {
    if (!model.get("editable") || e.button !== 0 || model.get("count") !== 1) return;
    e.preventDefault();
    points = [];
    add(e);
  };
  const move = (e) => { if (points !== null) add(e); };
  canvas.addEventListener("pointerdown", down);
  canvas.addEventListener("pointermove", move);
  canvas.addEventListener("pointerup", finish);
  canvas.addEventListener("pointerleave", finish);
  canvas.addEventListener("pointercancel", finish);
  const keys = ["rgba", "mask", "outline", "height", "width", "count", "columns", "scale", "gap", "editable"];
  for (const k of keys) model.on(`change:${k}`, draw);
  draw();
  return () => { for (const k of keys) model.off(`change:${k}`, draw); };
}
export default { render };
