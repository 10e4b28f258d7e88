"""`Editor.erase_and_fill`: real inpainting of a loaded image inside the editor (issue 19, build 1). The erased
pixels never reach the model; the result is `sosvae_lib.inpaint.inpaint`'s; strokes, samples and undo go on from it."""

from __future__ import annotations

import pytest
import torch

from sosvae_lib import inpaint as I
from sosvae_lib.editing import Editor
from sosvae_lib.runs import Run, stack_images

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(trained_smoke_run):
    return Run(trained_smoke_run(epochs=1))


def _image(run: Run) -> torch.Tensor:
    return run.images("test", 1)[0]


def _bottom(h: int, w: int) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.bool)
    m[h // 2:] = True
    return m


def test_the_erased_pixels_never_reach_the_model_and_the_image_is_inpaint_of_the_kept_ones(run):
    x = _image(run)
    c, h, w = x.shape
    erase = _bottom(h, w)
    a = Editor(run, image=x)
    filled = a.erase_and_fill(mask=erase)
    assert torch.equal(a.erased, erase.expand(c, h, w))
    # other pixels where they were erased: the same result, bitwise
    b = Editor(run, image=torch.where(erase.expand(c, h, w), torch.rand(c, h, w), x))
    assert torch.equal(b.erase_and_fill(mask=erase), filled)
    # the kept pixels are the image's; the erased ones inpaint's conditional mean (no calibration stored here)
    assert run.calibration() is None
    kept = ~erase.expand(c, h, w)
    assert torch.equal(filled[kept], x[kept])
    fill = stack_images(run.dataset("train", 500, augment=False), 500).mean(0)
    want = I.inpaint(a.model, x[None], kept.reshape(1, -1), fill=fill)
    torch.testing.assert_close(filled, want.mean[0], atol=1e-6, rtol=0)
    assert not torch.allclose(filled[~kept], x[~kept])  # something was filled in


def test_strokes_samples_and_undo_go_on_from_the_filled_image(run):
    x = _image(run)
    c, h, w = x.shape
    ed = Editor(run, image=x, seed=3)
    filled = ed.erase_and_fill([(h - 2, 1), (h - 2, w - 2)], width=4)  # a stroke along the bottom
    assert ed.strokes == 1 and int(ed.erased[0].sum()) > 0
    kept = ~ed.erased
    draws = ed.samples(3)
    assert torch.equal(draws[:, kept], x[kept].expand(3, -1))  # samples complete only the erased region
    assert draws[:, ~kept].std(0).mean() > 0
    ed.paint([(1, 1), (2, 2)], 0.0, 1)
    assert ed.strokes == 2
    assert torch.equal(ed.undo(), filled)
    # a second erasure adds to the first
    first = ed.erased.clone()
    ed.erase_and_fill(mask=torch.eye(h, w, dtype=torch.bool))
    assert torch.equal(ed.erased, first | torch.eye(h, w, dtype=torch.bool).expand(c, h, w))


def test_erase_and_fill_names_its_bad_arguments(run):
    x = _image(run)
    c, h, w = x.shape
    with pytest.raises(ValueError, match="image"):
        Editor(run).erase_and_fill(mask=_bottom(h, w))  # a prior draw: no pixels to keep
    ed = Editor(run, image=x)
    with pytest.raises(ValueError, match="points"):
        ed.erase_and_fill()
    with pytest.raises(ValueError, match="points"):
        ed.erase_and_fill([(1, 1)], mask=_bottom(h, w))
    with pytest.raises(ValueError, match="mask"):
        ed.erase_and_fill(mask=_bottom(h, w).float())
    with pytest.raises(ValueError, match="mask"):
        ed.erase_and_fill(mask=torch.ones(h + 1, w, dtype=torch.bool))
    with pytest.raises(ValueError, match="every pixel"):
        ed.erase_and_fill(mask=torch.ones(h, w, dtype=torch.bool))
    assert ed.erased is None and ed.strokes == 0  # a refused call changes nothing


def test_screen_erase_is_erase_and_fill_of_the_screen_points(run):
    x = _image(run)
    c, h, w = x.shape
    size = (4 * w, 4 * h)  # the canvas shown 4× enlarged
    ed = Editor(run, image=x)
    assert ed.can_erase and not Editor(run).can_erase
    assert ed.screen_erase([[-5.0, 3.0], [4 * w + 1.0, 3.0]], size) is None  # every point outside: nothing
    assert ed.erased is None and ed.strokes == 0
    points = [[2.0, 4 * h - 6.0], [4 * w - 3.0, 4 * h - 6.0]]  # along the bottom row band, in CSS pixels
    got = ed.screen_erase(points, size, width=3)
    want = Editor(run, image=x)
    want.erase_and_fill([(h - 1.5, 0.5), (h - 1.5, w - 0.75)], width=3)  # screen_to_pixel of the same points
    assert torch.equal(got, want.image) and torch.equal(ed.erased, want.erased)
    assert int(ed.erased[0].sum()) > 0 and not ed.erased[:, : h // 2].any()
    with pytest.raises(ValueError, match="image"):
        Editor(run).screen_erase(points, size)


def test_the_widget_erases_and_fills_with_its_erase_brush(run):
    pytest.importorskip("anywidget")
    from sosvae_lib import widget as Wd

    x = _image(run)
    c, h, w = x.shape
    ui = Wd.EditorUI(Editor(run, image=x), n_samples=2, scale=4)
    assert ui.tool.layout.display is None and not ui.tool.disabled and ui.tool.value == "paint"
    ui.tool.value = "erase"
    ui.width_slider.value = 3
    points = [[2.0, 4 * h - 6.0], [4 * w - 3.0, 4 * h - 6.0]]
    ui._on_canvas_msg(ui.canvas, {"type": "stroke", "points": points, "size": [4 * w, 4 * h]})
    want = Editor(run, image=x)
    want.screen_erase(points, (4 * w, 4 * h), width=3)
    assert torch.equal(ui.editor.image, want.image) and torch.equal(ui.editor.erased, want.erased)
    assert ui.canvas.rgba == Wd.to_rgba(want.image.unsqueeze(0))
    assert ui.canvas.mask == want.erased[0].to(torch.uint8).numpy().tobytes()  # the erased pixels are outlined
    assert f"{int(want.erased[0].sum())} pixels erased and filled" in ui.status.value
    assert ui.sample_canvas.rgba == Wd.to_rgba(ui.editor.samples(2, ui.editor.seed))  # samples of the filled image
    ui.tool.value = "paint"  # back to painting: a stroke conditions on the kept and the filled pixels
    ui._on_canvas_msg(ui.canvas, {"type": "stroke", "points": [[2.0, 2.0]], "size": [4 * w, 4 * h]})
    assert ui.editor.strokes == 2 and torch.equal(ui.editor.erased, want.erased)
    hidden = Wd.EditorUI(Editor(run), n_samples=1)  # a prior draw: nothing to erase, the tool is hidden
    assert hidden.tool.layout.display == "none" and hidden.tool.disabled
