"""The editor (`sosvae_lib.editing`, its widget `sosvae_lib.widget`): exact screen → pixel mapping, the one stroke
rasteriser, and the state machine driven through simulated mouse events: a stroke changes the image exactly as
`LowRankNormal.condition` predicts, undo restores the previous image bitwise, reset returns to μ, the pixel-wise
model changes only the painted pixels; samples, principal directions, the ε option and the calibrated-ε switch; the
headless scripted session; the module's place in the package (no orchestrator, the widget's JavaScript as package
data)."""

from __future__ import annotations

import math

import pytest
import torch

from sosvae_lib import editing as E
from sosvae_lib import widget as Wd
from sosvae_lib.calibration import Calibration
from sosvae_lib.config import TrainConfig
from sosvae_lib.distributions import DiagonalNormal, LowRankNormal
from sosvae_lib.model import build_model
from sosvae_lib.runs import Run

SHAPE = (1, 8, 10)  # C, H, W: not square, so rows and columns cannot be swapped unnoticed
D = math.prod(SHAPE)


def lowrank(rank: int = 3, seed: int = 0, diag: float | torch.Tensor = 1e-3, shape=SHAPE) -> LowRankNormal:
    g = torch.Generator().manual_seed(seed)
    d = math.prod(shape)
    loc = 0.5 + 0.1 * torch.randn(1, d, generator=g)
    factor = 0.2 * torch.randn(1, d, rank, generator=g)
    return LowRankNormal(loc, factor, torch.as_tensor(diag, dtype=torch.float32))


def diagonal(seed: int = 0) -> DiagonalNormal:
    g = torch.Generator().manual_seed(seed)
    return DiagonalNormal(0.5 + 0.1 * torch.randn(1, D, generator=g), 0.01 + torch.rand(1, D, generator=g))


def expected_mask(cells, shape=SHAPE) -> torch.Tensor:
    """bool [1, D]: every channel of the listed (row, col) pixels, built by hand."""
    c, h, w = shape
    grid = torch.zeros(c, h, w, dtype=torch.bool)
    for r, col in cells:
        grid[:, r, col] = True
    return grid.reshape(1, -1)


def mouse(ui_or_editor, points, size, value=0.0, width=1):
    """A simulated drag and release: through the widget's message handler when the widget is given (what the
    browser sends), else through `Editor.screen_stroke` (what that handler calls)."""
    if isinstance(ui_or_editor, Wd.EditorUI):
        ui_or_editor.width_slider.value = width
        ui_or_editor.value_picker.value = value
        ui_or_editor._on_canvas_msg(ui_or_editor.canvas, {"type": "stroke", "points": points, "size": list(size)})
        return ui_or_editor.editor.image
    return ui_or_editor.screen_stroke(points, size, value, width)


# -------------------------------------------------------------------------------------------------------------
# geometry
# -------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(80.0, 64.0), (300.0, 150.0), (10.0, 8.0)])  # scales 8, 30 × 18.75, 1
def test_screen_to_pixel_is_exact_at_every_pixel_edge(size):
    h, w = SHAPE[1:]
    cw, ch = size
    for j in range(w):
        left, right = j * cw / w, (j + 1) * cw / w
        assert math.floor(E.screen_to_pixel(left, 0.0, size, (h, w))[1]) == j
        assert math.floor(E.screen_to_pixel(math.nextafter(right, 0), 0.0, size, (h, w))[1]) == j
    for i in range(h):
        top, bottom = i * ch / h, (i + 1) * ch / h
        assert math.floor(E.screen_to_pixel(0.0, top, size, (h, w))[0]) == i
        assert math.floor(E.screen_to_pixel(0.0, math.nextafter(bottom, 0), size, (h, w))[0]) == i


def test_screen_to_pixel_rejects_points_outside_and_bad_sizes():
    with pytest.raises(ValueError, match=r"^x: screen point outside"):
        E.screen_to_pixel(80.0, 1.0, (80, 64), (8, 10))
    with pytest.raises(ValueError, match=r"^y: screen point outside"):
        E.screen_to_pixel(1.0, -0.5, (80, 64), (8, 10))
    with pytest.raises(ValueError, match=r"^size:"):
        E.screen_to_pixel(1.0, 1.0, (0, 64), (8, 10))
    with pytest.raises(ValueError, match=r"^size:"):
        E.screen_to_pixel(1.0, 1.0, 80, (8, 10))


def test_stroke_pixels_paths_brushes_and_clipping():
    hw = SHAPE[1:]
    one = E.stroke_pixels([(2.7, 3.2)], hw, 1)
    assert one.sum() == 1 and one[2, 3]
    square = E.stroke_pixels([(4, 4)], hw, 3)
    assert square.sum() == 9 and square[3:6, 3:6].all()
    even = E.stroke_pixels([(4, 4)], hw, 2)  # offsets 0, +1
    assert even.sum() == 4 and even[4:6, 4:6].all()
    line = E.stroke_pixels([(1, 0), (1, 9)], hw, 1)
    assert line.sum() == 10 and line[1].all()
    diag = E.stroke_pixels([(0, 0), (7, 7)], hw, 1)
    assert diag.sum() == 8 and all(diag[k, k] for k in range(8))  # 8-connected, one pixel per step
    corner = E.stroke_pixels([(0, 0)], hw, 3)  # clipped, not clamped onto the border
    assert corner.sum() == 4 and corner[:2, :2].all()


@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 8, 10), (1, 64, 64)])
def test_the_figures_strokes_are_the_editors_strokes(shape):
    """One rasteriser: `edit_strokes` (the editing figure) paints, in every channel, exactly the pixels of
    `stroke_pixels` along `fraction_points` (the widget's and `Editor.paint`'s), and its images are the editor's,
    bitwise. (Was a second rasteriser: at 16×16 the default strokes painted pixel (13, 2) the editor does not.)"""
    c, h, w = shape
    dist = lowrank(rank=2, shape=shape)
    edit = E.edit_strokes(dist, shape, E.DEFAULT_STROKES, value=0.0, width=1)
    ed = E.Editor(dist, image_shape=shape)
    painted = torch.zeros(h, w, dtype=torch.bool)
    for k, stroke in enumerate(E.DEFAULT_STROKES):
        painted |= E.stroke_pixels(E.fraction_points(stroke, (h, w)), (h, w), 1)
        assert torch.equal(edit.masks[k], painted.expand(c, h, w).reshape(-1))
        assert torch.equal(edit.after[k], ed.paint(E.fraction_points(stroke, (h, w)), 0.0, 1).reshape(-1))
    assert torch.equal(edit.before, dist.loc.reshape(-1))
    if shape == (1, 16, 16):  # the default strokes' pixels, by hand: an 8-connected polyline, then a diagonal
        assert sorted(map(tuple, painted.nonzero().tolist())) == [(2, 6), (2, 7), (2, 8), (2, 9), (12, 2), (13, 3)]


def test_the_editing_module_imports_no_orchestrator_and_the_widget_ships_its_javascript():
    import ast
    from importlib import resources
    from pathlib import Path

    for module in (E, Wd):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not imported & {"reproduce", "plots", "train", "evaluate", "sosvae_lib.reproduce"}, module.__name__
        if module is E:
            assert "widget" not in imported
    js = resources.files("sosvae_lib").joinpath("widget.js").read_text(encoding="utf-8")
    assert js == Wd.canvas_esm() and "export default { render }" in js and 'type: "stroke"' in js
    pytest.importorskip("anywidget")
    assert Wd._canvas_class()._esm == js


@pytest.mark.parametrize("points, width, match", [
    ([(8.0, 0.0)], 1, r"^points: \(row, col\) must lie inside the 8×10 image"),
    ([(0.0, -0.1)], 1, r"^points: .*at index 0"),
    ([(1, 1), (2, 10)], 1, r"^points: .*at index 1"),
    ([], 1, r"^points:"),
    ([(1, 1)], 0, r"^width: must be an integer >= 1"),
    ([(1, 1)], 1.5, r"^width:"),
    ([(float("nan"), 1)], 1, r"^points: must be finite"),
])
def test_stroke_errors_name_the_parameter(points, width, match):
    with pytest.raises(ValueError, match=match):
        E.stroke_pixels(points, SHAPE[1:], width)


# -------------------------------------------------------------------------------------------------------------
# the state machine, through simulated mouse events
# -------------------------------------------------------------------------------------------------------------

@pytest.fixture(params=["editor", "widget"])
def driver(request):
    """Build an editor over a distribution and return (editor, what the mouse events go to)."""
    def make(dist, shape=SHAPE, **kw):
        ed = E.Editor(dist, image_shape=shape, **kw)
        if request.param == "widget":
            pytest.importorskip("anywidget")
            return ed, Wd.EditorUI(ed, n_samples=2)
        return ed, ed
    return make


def test_a_stroke_changes_the_image_exactly_as_condition_predicts(driver):
    dist = lowrank()
    ed, target = driver(dist)
    mu = ed.image
    assert torch.equal(mu.reshape(1, -1), dist.loc)
    # canvas shown at 80×64 CSS px (8 px per pixel): a drag along row 2 from column 1 to column 4, released
    img = mouse(target, [[8.5, 16.0], [20.0, 23.9], [39.9, 17.0]], (80, 64), value=0.1, width=1)
    mask = expected_mask([(2, 1), (2, 2), (2, 3), (2, 4)])
    assert torch.equal(ed.mask.reshape(1, -1), mask)
    values = torch.where(mask, torch.tensor(0.1), torch.tensor(0.0))
    predicted = dist.condition(mask, values).mean
    assert torch.equal(img.reshape(1, -1), predicted)  # bitwise: the editor calls condition, nothing else
    assert torch.all(img.reshape(1, -1)[mask] == 0.1)
    assert (img - mu).abs().reshape(1, -1)[~mask].max() > 1e-3  # the edit propagated


def test_undo_restores_bitwise_and_reset_returns_to_mu(driver):
    ed, target = driver(lowrank(seed=1))
    mu = ed.image
    first = mouse(target, [[5.0, 5.0], [70.0, 5.0]], (80, 64), value=0.0, width=1).clone()
    second = mouse(target, [[40.0, 60.0]], (80, 64), value=1.0, width=3).clone()
    assert ed.strokes == 2 and not torch.equal(first, second)
    if isinstance(target, Wd.EditorUI):
        target.undo_button.click()
    else:
        ed.undo()
    assert ed.strokes == 1 and torch.equal(ed.image, first)
    if isinstance(target, Wd.EditorUI):
        assert target.canvas.rgba == Wd.to_rgba(first.unsqueeze(0))  # what is displayed follows
        target.reset_button.click()
    else:
        ed.reset()
    assert ed.strokes == 0 and torch.equal(ed.image, mu) and not ed.mask.any()
    ed.undo()  # nothing left to undo: a no-op
    assert torch.equal(ed.image, mu)


def test_the_diagonal_model_changes_only_the_painted_pixels(driver):
    ed, target = driver(diagonal())
    mu = ed.image
    img = mouse(target, [[12.0, 9.0], [12.0, 50.0]], (80, 64), value=0.25, width=2)
    changed = img != mu
    assert changed.any()
    assert not (changed & ~ed.mask).any()
    assert torch.all(img[ed.mask] == 0.25)


def test_points_outside_the_canvas_are_dropped_and_a_stroke_outside_paints_nothing(driver):
    ed, target = driver(lowrank())
    mu = ed.image
    mouse(target, [[-1.0, 3.0], [80.0, 3.0]], (80, 64))
    assert ed.strokes == 0 and torch.equal(ed.image, mu)
    mouse(target, [[79.99, 63.99], [85.0, 70.0]], (80, 64))
    assert ed.strokes == 1 and torch.equal(ed.mask.reshape(1, -1), expected_mask([(7, 9)]))


def test_a_pixel_painted_twice_keeps_its_latest_value():
    dist = lowrank()
    ed = E.Editor(dist, image_shape=SHAPE)
    ed.paint([(3, 3), (3, 6)], 0.0, 1)
    img = ed.paint([(1, 5), (5, 5)], 1.0, 1)
    mask = expected_mask([(3, 3), (3, 4), (3, 6)] + [(r, 5) for r in range(1, 6)])
    values = torch.zeros(1, D)
    values[expected_mask([(r, 5) for r in range(1, 6)])] = 1.0
    assert torch.equal(ed.mask.reshape(1, -1), mask)
    assert torch.equal(img.reshape(1, -1), dist.condition(mask, values).mean)


def test_colour_strokes_set_each_channel():
    shape = (3, 6, 6)
    dist = lowrank(rank=4, shape=shape)
    ed = E.Editor(dist, image_shape=shape)
    img = ed.paint([(2, 2)], (1.0, 0.5, 0.0), 1)
    assert img[:, 2, 2].tolist() == [1.0, 0.5, 0.0]
    grey = ed.paint([(4, 4)], 0.25, 1)
    assert grey[:, 4, 4].tolist() == [0.25] * 3


@pytest.mark.parametrize("value, match", [(1.5, r"^value: must be a grey level in \[0, 1\]"), (-0.1, r"^value:"),
                                           ((0.1, 0.2), r"^value:"), ("black", r"^value:"),
                                           (float("nan"), r"^value:")])
def test_bad_values_name_the_parameter(value, match):
    ed = E.Editor(lowrank(), image_shape=SHAPE)
    with pytest.raises(ValueError, match=match):
        ed.paint([(1, 1)], value, 1)
    assert ed.strokes == 0


def test_constructor_errors_name_the_parameter():
    with pytest.raises(ValueError, match=r"^image_shape: required"):
        E.Editor(lowrank())
    with pytest.raises(ValueError, match=r"^source: the distribution must have event shape"):
        E.Editor(lowrank(), image_shape=(1, 4, 4))
    with pytest.raises(TypeError, match=r"^source:"):
        E.Editor(42)
    with pytest.raises(ValueError, match=r"^source: is a conditional"):
        E.Editor(lowrank().condition(expected_mask([(0, 0)]), torch.zeros(1, D)), image_shape=SHAPE)
    with pytest.raises(ValueError, match=r"^image: must be None when source is a distribution"):
        E.Editor(lowrank(), image=0, image_shape=SHAPE)
    with pytest.raises(ValueError, match=r"^seed:"):
        E.Editor(lowrank(), image_shape=SHAPE, seed=-1)
    with pytest.raises(ValueError, match=r"^eps: must be a finite number > 0 or None"):
        E.Editor(lowrank(), image_shape=SHAPE, eps=0.0)


# -------------------------------------------------------------------------------------------------------------
# samples, principal directions, ε
# -------------------------------------------------------------------------------------------------------------

def test_samples_keep_the_strokes_and_the_same_seed_gives_the_same_bits():
    ed = E.Editor(lowrank(), image_shape=SHAPE, seed=3)
    ed.paint([(0, 0), (0, 9)], 0.0, 2)
    a, b, c = ed.samples(5), ed.samples(5), ed.samples(5, seed=4)
    assert a.shape == (5,) + SHAPE and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.all(a[:, ed.mask] == 0.0)
    assert a[:, ~ed.mask].std(0).mean() > 1e-3
    with pytest.raises(ValueError, match=r"^n:"):
        ed.samples(0)


def test_principal_directions_sweep_around_the_current_image_and_keep_the_strokes():
    dist = lowrank(rank=3)
    ed = E.Editor(dist, image_shape=SHAPE)
    w = ed.directions()
    gram = (dist.cov_factor[0].double().T @ dist.cov_factor[0].double())
    assert torch.allclose(w, torch.linalg.eigvalsh(gram).flip(0), rtol=1e-9, atol=1e-12)
    assert torch.equal(ed.explore([0.0, 0.0]), ed.image)
    moved = ed.explore([2.0])  # μ + 2 √w₁ u₁: its distance from μ is 2 √w₁
    assert float((moved - ed.image).double().norm()) == pytest.approx(2 * float(w[0]) ** 0.5, rel=1e-5)
    ed.paint([(4, 2), (4, 7)], 0.0, 1)
    swept = ed.explore([1.5, -1.0, 0.5])
    assert torch.allclose(swept[ed.mask], torch.zeros(int(ed.mask.sum())), atol=1e-6)  # painted pixels stay
    assert (swept - ed.image).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"^t: must be at most R = 3"):
        ed.explore([0.0] * 4)
    assert E.Editor(diagonal(), image_shape=SHAPE).directions().numel() == 0


def test_eps_replaces_a_fixed_diagonal_and_scales_a_learned_one():
    dist = lowrank(diag=1e-5)
    ed = E.Editor(dist, image_shape=SHAPE, eps=0.02)
    assert torch.all(ed.distribution.cov_diag == 0.02)
    img = ed.paint([(2, 2), (2, 8)], 0.0, 1)
    mask = ed.mask.reshape(1, -1)
    ref = LowRankNormal(dist.loc, dist.cov_factor, torch.tensor(0.02)).condition(mask, torch.zeros(1, D)).mean
    assert torch.equal(img.reshape(1, -1), ref)
    # back to the trained ε, strokes kept: the image is the one the trained distribution predicts
    trained = ed.set_eps(None)
    assert torch.equal(trained.reshape(1, -1), dist.condition(mask, torch.zeros(1, D)).mean)
    assert not torch.equal(trained, img)
    # a larger ε regularises the fit: the propagated change shrinks
    change = lambda e: float((E.Editor(dist, image_shape=SHAPE, eps=e).paint([(2, 2), (2, 8)], 0.0, 1)
                              - dist.loc.reshape(SHAPE)).abs()[~ed.mask].max())
    assert change(1.0) < change(1e-3)
    learned = lowrank(diag=0.01 + torch.rand(1, D, generator=torch.Generator().manual_seed(5)))
    ed2 = E.Editor(learned, image_shape=SHAPE, eps=3.0)
    assert torch.allclose(ed2.distribution.cov_diag, 3.0 * learned.cov_diag)
    assert torch.allclose(E.Editor(diagonal(), image_shape=SHAPE, eps=2.0).distribution.cov_diag,
                          2.0 * diagonal().cov_diag)


def test_set_eps_keeps_undo_consistent():
    dist = lowrank()
    ed = E.Editor(dist, image_shape=SHAPE)
    ed.paint([(1, 1)], 0.0, 1)
    ed.paint([(6, 8)], 1.0, 1)
    ed.set_eps(0.5)
    undone = ed.undo()
    ref = LowRankNormal(dist.loc, dist.cov_factor, torch.tensor(0.5)).condition(
        expected_mask([(1, 1)]), torch.zeros(1, D)).mean
    assert torch.equal(undone.reshape(1, -1), ref)


def _calibration(scale: float, eps: float | None) -> Calibration:
    return Calibration(scale=scale, eps=eps, trained_eps=None if eps is None else eps / scale, nll_trained=100.0,
                       nll_calibrated=90.0, num_images=8, num_dims=D, at_bound=False)


def test_calibrated_eps_is_read_from_the_run_and_drives_the_switch(tmp_path):
    run = Run(tmp_path)
    assert E.calibrated_eps(run) is None
    run.write_evaluation("test", {"test_nll_bpd": 6.5})
    assert E.calibrated_eps(tmp_path) is None
    run.write_evaluation("test", {"eps_calibrated": 0.004, "diag_scale_calibrated": 4.0})
    assert E.calibrated_eps(tmp_path) == 0.004 and E.calibrated_eps(tmp_path, fixed=False) == 4.0
    run.write_evaluation("val", {"eps_calibrated": -1, "diag_scale_calibrated": float("inf")})  # invalid: ignored
    assert E.calibrated_eps(tmp_path) == 0.004 and E.calibrated_eps(tmp_path, fixed=False) == 4.0
    # the run's calibration (Run.calibration) comes first: the calibrated ε of a fixed diagonal, the multiplier of
    # a learned one
    run.write_calibration(_calibration(200.0, 0.002), split="val", seed=0)
    assert E.calibrated_eps(run, fixed=True) == 0.002 and E.calibrated_eps(run, fixed=False) == 200.0
    run.write_calibration(_calibration(3.0, None), split="val", seed=0)  # a learned diagonal's: no ε, use the eval
    assert E.calibrated_eps(run, fixed=True) == 0.004 and E.calibrated_eps(run, fixed=False) == 3.0

    pytest.importorskip("anywidget")
    dist = lowrank(diag=1e-5)
    hidden = Wd.EditorUI(E.Editor(dist, image_shape=SHAPE))
    assert hidden.eps_switch.layout.display == "none" and hidden.eps_switch.disabled
    ui = Wd.EditorUI(E.Editor(dist, image_shape=SHAPE, calibrated=0.004))
    assert ui.eps_switch.layout.display != "none" and not ui.eps_switch.disabled
    mouse(ui, [[30.0, 30.0]], (80, 64))
    ui.eps_switch.value = "calibrated"
    assert ui.editor.eps == 0.004 and torch.all(ui.editor.distribution.cov_diag[ui.editor.mask.reshape(1, -1) == 0]
                                                == 0.004)
    assert ui.canvas.rgba == Wd.to_rgba(ui.editor.image.unsqueeze(0))
    ui.eps_switch.value = "trained"
    assert ui.editor.eps is None


def test_a_learned_diagonal_is_not_scaled_by_the_eps_of_a_fixed_one(tmp_path):
    """An evaluation's ``eps_calibrated`` is the new ε of a fixed diagonal; a learned diagonal's multiplier is
    ``diag_scale_calibrated`` (was: eps_calibrated read as the multiplier, and the multiplier never found)."""
    Run(tmp_path).write_evaluation("test", {"eps_calibrated": None, "diag_scale_calibrated": 3.0})
    assert E.calibrated_eps(tmp_path, fixed=False) == 3.0 and E.calibrated_eps(tmp_path, fixed=True) is None
    Run(tmp_path).write_evaluation("test", {"eps_calibrated": 0.004, "diag_scale_calibrated": None})
    assert E.calibrated_eps(tmp_path, fixed=False) is None and E.calibrated_eps(tmp_path, fixed=True) == 0.004


# -------------------------------------------------------------------------------------------------------------
# the widget's other controls, models, run directories, the scripted session
# -------------------------------------------------------------------------------------------------------------

def test_to_rgba_layout():
    img = torch.tensor([[[[0.0, 1.0]], [[0.5, 2.0]], [[-1.0, 0.2]]]])  # [1, 3, 1, 2]
    assert Wd.to_rgba(img) == bytes([0, 128, 0, 255, 255, 255, 51, 255])
    assert Wd.to_rgba(torch.tensor([[[[0.2]]]])) == bytes([51, 51, 51, 255])
    with pytest.raises(ValueError, match=r"^images:"):
        Wd.to_rgba(torch.zeros(2, 2, 4, 4))


def test_widget_buttons_sliders_and_display():
    pytest.importorskip("anywidget")
    ed = E.Editor(lowrank(rank=3), image_shape=SHAPE, seed=2)
    ui = Wd.EditorUI(ed, n_samples=3, scale=8)
    assert (ui.canvas.height, ui.canvas.width, ui.canvas.scale, ui.canvas.editable) == (8, 10, 8, True)
    assert ui.canvas.rgba == Wd.to_rgba(ed.image.unsqueeze(0))
    assert ui.sample_canvas.count == 3 and ui.sample_canvas.rgba == Wd.to_rgba(ed.samples(3, 2))
    ui.sample_button.click()
    assert ui.sample_canvas.rgba == Wd.to_rgba(ed.samples(3, 3))
    ui.width_slider.value = 3
    ui.value_picker.value = 0.5
    assert ui.canvas.brush_width == 3 and ui.canvas.brush == "rgb(128, 128, 128)"
    assert len(ui.sliders) == 3
    ui.tabs.selected_index = 1
    ui.sliders[0].value = 1.0
    assert ui.explore_canvas.rgba == Wd.to_rgba(ed.explore([1.0, 0.0, 0.0]).unsqueeze(0))
    ui.zero_button.click()
    assert ui.explore_canvas.rgba == Wd.to_rgba(ed.image.unsqueeze(0))
    assert "application/vnd.jupyter.widget-view+json" in ui._repr_mimebundle_()
    assert math.isfinite(ui.last_update_ms) and "0 strokes" in ui.status.value and ui.canvas.mask == b""
    ui.tabs.selected_index = 0
    mouse(ui, [[8.0, 8.0], [30.0, 8.0]], (80, 64), width=1)
    assert ui.canvas.mask == ed.mask[0].to(torch.uint8).numpy().tobytes() and sum(ui.canvas.mask) == 3
    ui.outline_box.value = False
    assert ui.canvas.mask == b""
    rgb = Wd.EditorUI(E.Editor(lowrank(shape=(3, 4, 4)), image_shape=(3, 4, 4)))
    rgb.value_picker.value = "#ff8000"
    assert rgb._brush_value() == (1.0, 128 / 255, 0.0)


def _model(head: str):
    torch.manual_seed(0)
    model = build_model(TrainConfig.preset("smoke", dataset="orl", head=head, device="cpu"), (1, 16, 16)).eval()
    if head != "diagonal":  # an untrained P is ~1e-5: give it a size so that edits propagate visibly
        with torch.no_grad():
            model.head.factor_conv.weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1))
    return model


def test_editor_over_a_model_prior_draw_and_reconstruction():
    model = _model("lowrank")
    a, b = E.Editor(model, seed=4), E.Editor(model, seed=4)
    assert torch.equal(a.image, b.image) and a.rank == 2 and a.image_shape == (1, 16, 16)
    assert not torch.equal(a.image, E.Editor(model, seed=5).image)
    x = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(0))
    rec = E.Editor(model, image=x)
    with torch.no_grad():
        expected = model.decode(model.encode(x.unsqueeze(0)).mean).loc.reshape(1, 16, 16)
    assert torch.equal(rec.image, expected)
    with pytest.raises(ValueError, match=r"^image: an index into the test split needs a run"):
        E.Editor(model, image=0)
    with pytest.raises(ValueError, match=r"^image: must be None, a test-image index or a tensor"):
        E.Editor(model, image=torch.zeros(3, 3))
    # the lowrank head's ε is fixed: eps replaces it; lowrank-diag's is learned: eps multiplies it
    assert torch.all(E.Editor(model, eps=0.1).distribution.cov_diag == 0.1)
    ld = _model("lowrank-diag")
    assert torch.allclose(E.Editor(ld, eps=2.0).distribution.cov_diag, 2 * E.Editor(ld).distribution.cov_diag)


@pytest.fixture(scope="module")
def smoke_run(smoke_run, tmp_path_factory):
    """The session's smoke run (conftest), copied: a test here writes eval_test.json into it."""
    from conftest import copy_run
    return copy_run(smoke_run, tmp_path_factory.mktemp("run") / "orl-lowrank-r2")


def test_editor_over_a_run_directory_edits_a_test_image(smoke_run):
    from sosvae_lib.components import reconstruction

    run = Run(smoke_run)
    ed = E.Editor(smoke_run, image=1)
    x = run.images("test", 2)[1]
    assert torch.equal(E.run_image(run, 1), x) and ed.config == run.config
    assert torch.equal(ed.image.reshape(1, -1), reconstruction(run.load_model(), x).loc)
    assert torch.equal(E.Editor(run, image=1).image, ed.image)  # a Run or its folder
    assert ed.calibrated is None
    run.write_evaluation("test", {"eps_calibrated": 0.003})
    assert E.Editor(smoke_run, image=1).calibrated == 0.003
    run.eval_path("test").unlink()
    run.calibration_path.write_text("{ not a calibration")  # unreadable: the editor works without it, and says so
    with pytest.warns(UserWarning, match="the stored calibration is not used"):
        assert E.Editor(run, image=1).calibrated is None
    run.calibration_path.unlink()


@pytest.mark.parametrize("head", ["lowrank", "diagonal"])
def test_scripted_session_records_the_checks_and_draws_the_figure(head, tmp_path):
    from sosvae_lib.plots import save_figure, session_figure

    model = _model(head)
    ed = E.Editor(model, seed=0)
    s = E.scripted_session(ed, value=0.0, width=1, n_samples=3, seed=0)
    n = s.summary()
    assert n["undo_error"] == n["replay_error"] == n["reset_error"] == n["condition_error"] == 0
    assert n["sample_stroke_error"] == 0 and n["stroke_pixels"] > 0
    assert s.edit.after.shape == (2, 256) and s.samples.shape == (3, 256)
    assert ed.strokes == 2 and torch.equal(ed.image.reshape(-1), s.edit.after[-1])
    if head == "diagonal":
        assert n["propagated_rms"] == 0 and n["propagated_fraction"] == 0
    else:
        assert n["propagated_rms"] > 0 and n["propagated_fraction"] > 0.5
    paths = save_figure(session_figure({head: s}), tmp_path / "editor")
    assert all(p.stat().st_size > 1000 for p in paths)


# -------------------------------------------------------------------------------------------------------------
# what is edited: images refused or converted before anything is encoded (issue 17, items 3, 4, 5, 9, 11)
# -------------------------------------------------------------------------------------------------------------

COLOUR = (3, 16, 12)  # C, H, W: [H, W, C] = (16, 12, 3) cannot be mistaken for [C, H, W]


@pytest.fixture(scope="module")
def colour_model():
    torch.manual_seed(0)
    return build_model(TrainConfig.preset("smoke", dataset="synthetic", device="cpu"), COLOUR).eval()


def _x(shape=COLOUR) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(7))


def test_a_channels_last_or_misshaped_image_is_refused_naming_image(colour_model):
    x = _x()
    with pytest.raises(ValueError, match=r"^image: .*\[H, W, C\].*permute\(2, 0, 1\)"):
        E.Editor(colour_model, image=x.permute(1, 2, 0))  # same 576 elements: was reshaped and scrambled
    for bad in (x.transpose(1, 2), x.reshape(-1), x.reshape(3, 8, 24), x[:1], torch.zeros(2, 3, 16, 12)):
        with pytest.raises(ValueError, match=r"^image: must be None, .* tensor of shape \[C, H, W\] = \[3, 16, 12\]"):
            E.Editor(colour_model, image=bad)
    with pytest.raises(ValueError, match=r"^image: must be None, a test-image index or a tensor"):
        E.Editor(colour_model, image="face.png")
    # [1, C, H, W] is accepted, and so is [H, W] for a one-channel model
    assert torch.equal(E.Editor(colour_model, image=x.unsqueeze(0)).image, E.Editor(colour_model, image=x).image)
    grey, g = _model("lowrank"), _x((1, 16, 16))
    assert torch.equal(E.Editor(grey, image=g[0]).image, E.Editor(grey, image=g).image)
    with pytest.raises(ValueError, match=r"^image: must be None, .* tensor of shape \[C, H, W\] = \[1, 16, 16\]"):
        E.Editor(grey, image=g.reshape(16, 16, 1))


def test_a_uint8_image_is_divided_by_255_and_floats_outside_0_1_are_refused(colour_model):
    x8 = (_x() * 255).round().to(torch.uint8)
    x8[0, 0, :2] = torch.tensor([0, 255], dtype=torch.uint8)
    expected = E.Editor(colour_model, image=x8.float() / 255).image
    assert torch.equal(E.Editor(colour_model, image=x8).image, expected)  # was encoded as is, in 0…255
    with pytest.raises(ValueError, match=r"^image: float values must lie in \[0, 1\].*got values in \[0, 255\]"):
        E.Editor(colour_model, image=x8.float())
    with pytest.raises(ValueError, match=r"^image: float values must lie in \[0, 1\]"):
        E.Editor(colour_model, image=_x() - 0.5)
    for dtype in (torch.int64, torch.bool, torch.complex64):
        with pytest.raises(ValueError, match=rf"^image: dtype {dtype} is not an image dtype"):
            E.Editor(colour_model, image=_x().to(dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_image_is_refused(colour_model, bad):
    x = _x()
    x[1, 3, 4] = bad
    with pytest.raises(ValueError, match=r"^image: must be finite, got 1 NaN or infinite value"):
        E.Editor(colour_model, image=x)
    with pytest.raises(ValueError, match=r"^image: must be finite, got 576 NaN or infinite values"):
        E.Editor(colour_model, image=torch.full(COLOUR, bad))  # was an all-NaN edit


def test_a_float64_or_half_image_is_converted_to_the_model_dtype(colour_model):
    x = _x()
    expected = E.Editor(colour_model, image=x).image
    got = E.Editor(colour_model, image=x.double())  # was "Input type (double) and bias type (float)"
    assert got.image.dtype == torch.float32 and torch.equal(got.image, expected)
    half = E.Editor(colour_model, image=x.half()).image
    assert torch.equal(half, E.Editor(colour_model, image=x.half().float()).image)


def test_a_test_image_index_out_of_range_names_image(smoke_run):
    for bad in (-1, 10 ** 6):  # -1 named max_items; too large named image_index
        with pytest.raises(ValueError, match=r"^image: "):
            E.Editor(smoke_run, image=bad)
    with pytest.raises(ValueError, match=r"^image: must be None, a test-image index or a tensor"):
        E.Editor(smoke_run, image=True)
    with pytest.raises(ValueError, match=r"^image_index: must be in \[0, \d+\) for the test split of orl, got 1000000"):
        E.run_image(smoke_run, 10 ** 6)


# -------------------------------------------------------------------------------------------------------------
# ε too small for float32 conditioning (issue 17, item 14)
# -------------------------------------------------------------------------------------------------------------

def _dense_conditional_mean(dist: LowRankNormal, eps: float, mask: torch.Tensor, values: torch.Tensor):
    """float64, from the covariance blocks: μ_U + Σ_UO Σ_OO⁻¹ (x_O − μ_O), with Σ = P Pᵀ + eps I."""
    mu, P = dist.loc[0].double(), dist.cov_factor[0].double()
    o, u = mask.nonzero().flatten(), (~mask).nonzero().flatten()
    s_oo = P[o] @ P[o].T + eps * torch.eye(len(o), dtype=torch.float64)
    out = values.double().clone()
    out[u] = mu[u] + P[u] @ P[o].T @ torch.linalg.solve(s_oo, values.double()[o] - mu[o])
    return out


def test_set_eps_refuses_what_float32_conditioning_cannot_take():
    shape = (3, 32, 32)
    dist = lowrank(rank=25, diag=1e-3, shape=shape)
    dist = LowRankNormal(dist.loc, dist.cov_factor * 0.25, dist.cov_diag)  # rows ‖P_i‖² ≈ 0.06, as trained
    ed = E.Editor(dist, image_shape=shape)
    before = ed.image
    for bad in (1e-300, 1e-40, 1e-9, 1e39):  # 1e-300 was accepted and made the next paint fail deep inside
        with pytest.raises(ValueError, match=r"^eps: "):
            ed.set_eps(bad)
        assert ed.eps is None and torch.equal(ed.image, before)
    row_var = float(dist.cov_factor.double().square().sum(-1).max())
    assert ed.min_eps == pytest.approx(16 * torch.finfo(torch.float32).eps * row_var, rel=1e-6)
    with pytest.raises(ValueError, match=r"^eps: "):
        E.Editor(dist, image_shape=shape, eps=1e-300)
    with pytest.raises(ValueError, match=r"^calibrated: "):
        E.Editor(dist, image_shape=shape, calibrated=1e-300)
    with pytest.raises(ValueError, match=r"^eps: must lie in \[1.18e-38, 3.4e\+38\] \(normal numbers of torch.float32"):
        E.with_eps(dist, 1e-300, fixed=True)  # would round to a zero diagonal
    # at the bound, the float32 edit of a one-pixel stroke (3 observed values, R = 25) is the float64 one
    for eps in (ed.min_eps, 1e-3):
        ed.set_eps(eps)
        img = ed.paint([(5, 5)], 0.0, 1).reshape(-1)
        ref = _dense_conditional_mean(dist, eps, ed.mask.reshape(-1), ed.values.reshape(-1))
        change = float((ref - dist.loc[0].double()).abs().max())
        assert float((img.double() - ref).abs().max()) <= 1e-4 * change
        ed.reset()
    # a learned diagonal is multiplied by eps: the bound is per pixel, on eps · d_i
    d = 1e-3 * (1 + torch.rand(1, math.prod(shape), generator=torch.Generator().manual_seed(3)))
    learned = E.Editor(LowRankNormal(dist.loc, dist.cov_factor, d), image_shape=shape)
    ratio = float((dist.cov_factor.double().square().sum(-1) / d.double()).max())
    assert learned.min_eps == pytest.approx(16 * torch.finfo(torch.float32).eps * ratio, rel=1e-6)
    # the pixel-wise model only needs a positive, normal float32 diagonal
    assert E.Editor(diagonal(), image_shape=SHAPE).min_eps == pytest.approx(
        torch.finfo(torch.float32).tiny / float(diagonal().cov_diag.min()), rel=1e-6)


# -------------------------------------------------------------------------------------------------------------
# the editing notebooks' checks (issue 17, items 6 and 11), in the library
# -------------------------------------------------------------------------------------------------------------

def test_notebook_parameters_are_checked_under_their_own_names():
    E.check_parameters(image_index=0, patch=10, n_completions=5, stroke_value=0.0, stroke_width=None, n_samples=4,
                       seed=0)
    for name, bad, match in [("n_completions", "five", r"^n_completions: must be an integer >= 1"),
                             ("patch", 0, r"^patch:"), ("image_index", -1, r"^image_index:"),
                             ("stroke_value", 1.5, r"^stroke_value: must be a grey level in \[0, 1\]"),
                             ("stroke_width", 0, r"^stroke_width:"), ("n_samples", 2.0, r"^n_samples:"),
                             ("seed", -3, r"^seed:")]:
        with pytest.raises(ValueError, match=match):
            E.check_parameters(**{name: bad})
    with pytest.raises(TypeError, match=r"^check_parameters: unknown parameter 'n'"):
        E.check_parameters(n=5)


def test_a_run_of_the_wrong_head_is_refused_naming_its_parameter():
    diag = TrainConfig.preset("smoke", dataset="orl", head="diagonal", device="cpu")
    low = TrainConfig.preset("smoke", dataset="orl", device="cpu")
    E.check_runs({"lowrank": low, "diagonal": diag})
    E.check_runs({"lowrank": TrainConfig.preset("smoke", dataset="orl", head="lowrank-diag", device="cpu")})
    with pytest.raises(ValueError, match=r"^lowrank_run: is a run of the 'diagonal' head"):
        E.check_runs({"lowrank": diag, "diagonal": diag})
    with pytest.raises(ValueError, match=r"^diagonal_run: is a run of the 'lowrank' head"):
        E.check_runs({"lowrank": low, "diagonal": low})
    with pytest.raises(ValueError, match=r"^runs: unknown row 'pca'"):
        E.check_runs({"pca": low})


def test_the_runs_of_an_editing_notebook_must_be_finished(smoke_run, tmp_path):
    E.check_runs({"lowrank": Run(smoke_run)})
    E.check_runs({"lowrank": str(smoke_run)})  # the notebooks' parameter as it is
    with pytest.raises(FileNotFoundError, match=r"^lowrank_run: no finished run in .*train_missing=True"):
        E.check_runs({"lowrank": tmp_path / "none"})
    with pytest.raises(ValueError, match=r"^diagonal_run: is a run of the 'lowrank' head"):
        E.check_runs({"diagonal": smoke_run})


@pytest.mark.slow
def test_03_editing_stops_on_a_diagonal_lowrank_run_and_a_bad_n_completions(tmp_path):
    """Through papermill, as `reproduce` runs it: the notebook stops with the library's message, no figure."""
    import papermill
    from sosvae_lib import reproduce
    from sosvae_lib.train import train

    run = tmp_path / "orl-diagonal"
    train(TrainConfig.preset("smoke", dataset="orl", head="diagonal", device="cpu"), run, progress=False)
    figures = tmp_path / "figures"
    base = dict(lowrank_run=str(run), diagonal_run=None, train_missing=False, figures_dir=str(figures))
    for extra, message in [({}, "lowrank_run: is a run of the 'diagonal' head"),
                           ({"n_completions": "five"}, "n_completions: must be an integer >= 1")]:
        with pytest.raises(papermill.PapermillExecutionError) as err:
            reproduce.execute_notebook("03_editing", tmp_path / "03.ipynb", {**base, **extra}, tmp_path, 120)
        assert err.value.ename == "ValueError" and err.value.evalue.startswith(message)
        assert not list(figures.glob("orl_editing*"))
