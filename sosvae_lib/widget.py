"""The Jupyter widget of the editor (anywidget + ipywidgets, the ``notebooks`` extra): `EditorUI` over a
`sosvae_lib.editing.Editor`, display it as a notebook cell's result. Every handler calls the `Editor` API (a mouse
release `Editor.screen_stroke` (or `Editor.screen_erase` with the "erase and fill" brush), the buttons
`undo` / `reset` / `samples`, the ε switch `set_eps`, the sliders
`explore`), so everything the widget shows is what the editor computes without a frontend.

The browser side is ``widget.js`` (package data, read with `importlib.resources`, so it is found from a wheel and
from an editable install alike): a pixel canvas that draws H×W RGBA images enlarged without smoothing, outlines the
painted pixels and, when editable, sends the CSS-pixel points of a drag on release (see its header comment).
"""

from __future__ import annotations

import math
import time
from importlib import resources
from typing import Any, Mapping

import torch

from .config import check_int
from .editing import Editor, default_width

__all__ = ["EditorUI", "to_rgba", "canvas_esm"]


def canvas_esm() -> str:
    """The JavaScript module of the pixel canvas (``sosvae_lib/widget.js``)."""
    return resources.files(__package__).joinpath("widget.js").read_text(encoding="utf-8")


def to_rgba(images: torch.Tensor) -> bytes:
    """Images [N, C, H, W] (C = 1 or 3) → N·H·W·4 bytes of 8-bit RGBA (clipped to [0, 1], rounded; grey
    repeated over R, G, B; alpha 255), image after image, row-major: what the widget's canvas draws."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images: must have shape [N, C, H, W] with C = 1 or 3, got {tuple(images.shape)}")
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1)
    if x.shape[-1] == 1:
        x = x.expand(-1, -1, -1, 3)
    alpha = torch.full(x.shape[:-1] + (1,), 255, dtype=torch.uint8)
    return torch.cat([x.cpu(), alpha], -1).contiguous().numpy().tobytes()


_CANVAS_CSS = """
.sosvae-canvas { display: block; touch-action: none; image-rendering: pixelated; border: 0; padding: 0; }
.sosvae-canvas[data-editable="true"] { cursor: crosshair; }
"""

_CANVAS_CLASS = None


def _canvas_class():
    """The anywidget class of the pixel canvas (imported on first use: anywidget is an optional dependency)."""
    global _CANVAS_CLASS
    if _CANVAS_CLASS is None:
        try:
            import anywidget
            import traitlets
        except ImportError as err:
            raise ImportError("EditorUI needs anywidget and ipywidgets (the notebooks extra): "
                              "pip install -e '.[notebooks]'") from err

        class PixelCanvas(anywidget.AnyWidget):
            """``count`` H×W RGBA images (``rgba``, `to_rgba` bytes) drawn ``scale``× enlarged, ``columns`` per row,
            ``gap`` CSS pixels apart; ``mask`` (H·W bytes, empty: none) outlines pixels in the colour ``outline``;
            an ``editable`` one (a single image) sends strokes (see ``widget.js``)."""

            _esm = canvas_esm()
            _css = _CANVAS_CSS
            rgba = traitlets.Bytes(b"").tag(sync=True)
            height = traitlets.Int(1).tag(sync=True)
            width = traitlets.Int(1).tag(sync=True)
            count = traitlets.Int(1).tag(sync=True)
            columns = traitlets.Int(1).tag(sync=True)
            mask = traitlets.Bytes(b"").tag(sync=True)
            outline = traitlets.Unicode("#ff2d2d").tag(sync=True)
            scale = traitlets.Int(8).tag(sync=True)
            gap = traitlets.Int(4).tag(sync=True)
            editable = traitlets.Bool(False).tag(sync=True)
            brush = traitlets.Unicode("rgb(0, 0, 0)").tag(sync=True)
            brush_width = traitlets.Int(1).tag(sync=True)

        _CANVAS_CLASS = PixelCanvas
    return _CANVAS_CLASS


class EditorUI:
    """The editor's widget (display it as a cell's result). Tab "edit": the image, drawn ``scale``× enlarged
    (default: about 512 CSS pixels a side), on which a left-button drag paints a stroke; brush width and grey
    level (or colour); the tool "paint" or "erase and fill" (real inpainting of the stroke's pixels,
    `Editor.erase_and_fill`; shown when the editor holds a model and a loaded image, `Editor.can_erase`); undo,
    reset, sample (``n_samples`` conditional samples beside the image); the switch
    between the trained and the calibrated ε (hidden without calibration); a status line. Tab "principal
    directions": one slider per principal direction of P Pᵀ (the first ``max_directions``; None: all R) from −3
    to +3 standard deviations around the current image.

    The painted pixels are outlined (unless "outline strokes" is unticked), or the erased ones once something was
    erased. Every handler calls the `Editor` API: a mouse release calls `Editor.screen_stroke` (`_on_canvas_msg`;
    `Editor.screen_erase` with the "erase and fill" tool), the buttons `undo`, `reset`, `samples`, the
    switch `set_eps`, the sliders `explore`. ``last_update_ms`` is the time of the latest handler, from its call to
    the new image bytes set on the canvas.
    """

    def __init__(self, editor: Editor, n_samples: int = 4, scale: int | None = None,
                 max_directions: int | None = None):
        if not isinstance(editor, Editor):
            raise TypeError(f"editor: must be a sosvae_lib.editing.Editor, got {type(editor).__name__}")
        self.editor = editor
        self.n_samples = check_int("n_samples", n_samples, 1)
        c, h, w = editor.image_shape
        self.scale = max(1, 512 // max(h, w)) if scale is None else check_int("scale", scale, 1)
        k = editor.rank if max_directions is None else min(editor.rank, check_int("max_directions", max_directions, 1))
        import ipywidgets as W

        canvas_cls = _canvas_class()
        self.sample_clicks = 0
        self.last_update_ms = float("nan")
        self.canvas = canvas_cls(height=h, width=w, count=1, scale=self.scale, editable=True)
        columns = math.ceil(math.sqrt(self.n_samples))  # a square grid as tall as the image
        self.sample_canvas = canvas_cls(height=h, width=w, count=self.n_samples, columns=columns,
                                        scale=max(1, (self.scale * h - 4 * (columns - 1)) // (columns * h)))
        self.canvas.on_msg(self._on_canvas_msg)
        self.canvas.layout.margin = "0 16px 0 0"
        self.explore_canvas = canvas_cls(height=h, width=w, count=1, scale=self.scale, editable=False)
        self.explore_canvas.layout.margin = "0 16px 0 0"
        self.tabs = W.Tab(children=[self._edit_tab(W), self._explore_tab(W, k)])
        self.tabs.set_title(0, "edit")
        self.tabs.set_title(1, "principal directions")
        self.tabs.observe(self._on_tab, names="selected_index")
        self._update(lambda: None)

    def _edit_tab(self, W: Any) -> Any:
        """The "edit" tab: the canvas and the samples beside it, the brush, the buttons, the ε switch, the status."""
        c, h, w = self.editor.image_shape
        self.width_slider = W.IntSlider(value=default_width(self.editor.hw), min=1,
                                        max=min(min(h, w), max(4, min(h, w) // 4)), description="brush width")
        if c == 3:
            self.value_picker = W.ColorPicker(value="#000000", description="colour", concise=False)
        else:
            self.value_picker = W.FloatSlider(value=0.0, min=0.0, max=1.0, step=0.01, description="grey value")
        self.undo_button = W.Button(description="undo", icon="undo")
        self.reset_button = W.Button(description="reset", icon="refresh")
        self.sample_button = W.Button(description=f"sample {self.n_samples}", icon="random")
        self.tool = W.ToggleButtons(options=[("paint", "paint"), ("erase and fill", "erase")], value="paint",
                                    description="brush")
        self.tool.layout.display = None if self.editor.can_erase else "none"
        self.tool.disabled = not self.editor.can_erase
        self.undo_button.on_click(lambda _: self._update(self.editor.undo))
        self.reset_button.on_click(lambda _: self._update(self.editor.reset))
        self.sample_button.on_click(lambda _: self.sample())
        self.eps_switch = self._eps_switch(W)
        self.status = W.HTML()
        self.outline_box = W.Checkbox(value=True, description="outline strokes", indent=False)
        self.outline_box.observe(lambda _: self._draw_mask(), names="value")
        self.width_slider.observe(self._on_brush, names="value")
        self.value_picker.observe(self._on_brush, names="value")
        self._on_brush()
        return W.VBox([
            W.HBox([self.canvas, W.VBox([W.HTML("<b>samples from p(x | strokes)</b>"), self.sample_canvas])],
                   layout=W.Layout(align_items="flex-start")),
            W.HBox([self.width_slider, self.value_picker]), self.tool,
            W.HBox([self.undo_button, self.reset_button, self.sample_button, self.outline_box]),
            self.eps_switch, self.status])

    def _eps_switch(self, W: Any) -> Any:
        """The switch between the trained and the calibrated ε (hidden and disabled without a calibration)."""
        editor, cal = self.editor, self.editor.calibrated
        options = [("trained ε", "trained")]
        if cal is not None:
            options.append((f"calibrated ε = {cal:.3g}" if editor.fixed_diagonal else f"calibrated: d × {cal:.3g}",
                            "calibrated"))
        switch = W.ToggleButtons(options=options, description="ε",
                                 value="calibrated" if cal is not None and editor.eps == cal else "trained")
        switch.layout.display = None if cal is not None else "none"
        switch.disabled = cal is None
        switch.observe(self._on_eps, names="value")
        return switch

    def _explore_tab(self, W: Any, k: int) -> Any:
        """The "principal directions" tab: k sliders from −3 to +3 standard deviations beside their image."""
        self.sliders = [W.FloatSlider(value=0.0, min=-3.0, max=3.0, step=0.1, description=f"u{j + 1}",
                                      continuous_update=True) for j in range(k)]
        for s in self.sliders:
            s.observe(self._on_slider, names="value")
        self.zero_button = W.Button(description="all to 0")
        self.zero_button.on_click(lambda _: self._zero_sliders())
        self.spectrum = W.HTML()
        if not k:
            return W.VBox([W.HTML("The pixel-wise model has no covariance factor (rank 0): nothing to sweep.")])
        height = self.editor.image_shape[1] * self.scale
        slider_box = W.VBox(self.sliders, layout=W.Layout(max_height=f"{height}px", overflow="auto"))
        return W.VBox([W.HBox([self.explore_canvas, W.VBox([self.spectrum, slider_box, self.zero_button])],
                              layout=W.Layout(align_items="flex-start"))])

    # -- handlers: each calls the Editor API and redraws -----------------------------------------------------
    def _brush_value(self) -> float | tuple[float, float, float]:
        v = self.value_picker.value
        if isinstance(v, str):  # '#rrggbb' from the colour picker (or a CSS colour name, kept black)
            s = v.lstrip("#")
            if len(s) == 3:
                s = "".join(ch * 2 for ch in s)
            if len(s) != 6:
                return (0.0, 0.0, 0.0)
            return tuple(int(s[i:i + 2], 16) / 255 for i in (0, 2, 4))  # type: ignore[return-value]
        return float(v)

    def _on_brush(self, _change: Any = None) -> None:
        v = self._brush_value()
        rgb = [round(255 * x) for x in (v if isinstance(v, tuple) else (v, v, v))]
        self.canvas.brush = f"rgb({rgb[0]}, {rgb[1]}, {rgb[2]})"
        self.canvas.brush_width = self.width_slider.value

    def _on_canvas_msg(self, _widget: Any, content: Mapping[str, Any], _buffers: Any = None) -> None:
        """The mouse-release handler: {type: "stroke", points: [[x, y], ...], size: [width, height]}."""
        if not isinstance(content, Mapping) or content.get("type") != "stroke":
            return
        points, size, width = content.get("points", []), content.get("size"), self.width_slider.value
        if self.tool.value == "erase":
            self._update(lambda: self.editor.screen_erase(points, size, width))
        else:
            self._update(lambda: self.editor.screen_stroke(points, size, self._brush_value(), width))

    def _on_eps(self, change: Mapping[str, Any]) -> None:
        eps = self.editor.calibrated if change["new"] == "calibrated" else None
        self._update(lambda: self.editor.set_eps(eps))

    def sample(self) -> None:
        """The sample button: n new conditional samples (seed = the editor's seed + the number of clicks)."""
        self.sample_clicks += 1
        self._draw_samples()

    def _draw_samples(self) -> None:
        s = self.editor.samples(self.n_samples, self.editor.seed + self.sample_clicks)
        self.sample_canvas.rgba = to_rgba(s)

    def _draw_mask(self) -> None:
        """Outline the painted pixels, or the erased ones once something was erased (every kept pixel is then
        fixed, so the painted mask would cover the whole image)."""
        erased = self.editor.erased
        mask = self.editor.mask[0] if erased is None else erased[0]
        show = self.outline_box.value and bool(self.editor.strokes)
        self.canvas.mask = mask.to(torch.uint8).cpu().numpy().tobytes() if show else b""

    def _on_slider(self, _change: Any = None) -> None:
        if self.sliders:
            self.explore_canvas.rgba = to_rgba(self.editor.explore([s.value for s in self.sliders]).unsqueeze(0))

    def _zero_sliders(self) -> None:
        for s in self.sliders:
            s.unobserve(self._on_slider, names="value")
            s.value = 0.0
            s.observe(self._on_slider, names="value")
        self._on_slider()

    def _on_tab(self, change: Mapping[str, Any]) -> None:
        if change["new"] == 1:
            self._refresh_directions()

    def _refresh_directions(self) -> None:
        if not self.sliders:
            return
        w = self.editor.directions().cpu()  # R numbers: one read-back, then host arithmetic
        total = float(w.sum())
        shares = ", ".join(f"{float(x) / total:.0%}" if total > 0 else "0%" for x in w[:len(self.sliders)])
        self.spectrum.value = f"<small>share of tr(P Pᵀ) per direction: {shares}</small>"
        for j, s in enumerate(self.sliders):
            s.tooltip = f"√w = {float(w[j]) ** 0.5:.3g}"
        self._on_slider()

    def _update(self, action) -> None:
        t0 = time.perf_counter()
        action()
        self.canvas.rgba = to_rgba(self.editor.image.unsqueeze(0))
        self.last_update_ms = 1e3 * (time.perf_counter() - t0)
        self._draw_mask()
        self._draw_samples()  # the samples shown must come from the new conditional
        if self.tabs.selected_index == 1:
            self._refresh_directions()
        e = self.editor
        eps = "trained ε" if e.eps is None else f"ε = {e.eps:.3g}"
        erased = e.erased  # a copy: read once
        if erased is None:
            count, verb = int(e.mask[0].sum()), "painted"
        else:
            count, verb = int(erased[0].sum()), "erased and filled"
        what = f"{count} pixel{'s' if count != 1 else ''} {verb}"
        self.status.value = (f"<small>{e.strokes} stroke{'s' if e.strokes != 1 else ''} · {what} · {eps} · "
                             f"R = {e.rank} · update {self.last_update_ms:.1f} ms</small>")

    def _repr_mimebundle_(self, **kwargs: Any):
        return self.tabs._repr_mimebundle_(**kwargs)
