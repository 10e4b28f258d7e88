"""The editor (`sosvae_lib.editing`, its widget `sosvae_lib.widget`) on a CUDA model, proved on the CPU: every operation of `Editor` and the
handlers of its widget run on tensors that claim ``cuda`` (tests/fake_cuda.py), where a CPU tensor meeting a CUDA
one raises as on a GPU, and give the values of the same editor run on the CPU. A paint adds no host read-back to the
conditioning's own."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fake_cuda import fake_cuda, real
from sosvae_lib import editing as E
from sosvae_lib import widget as Wd
from sosvae_lib.config import TrainConfig
from sosvae_lib.distributions import DiagonalNormal, LowRankNormal
from sosvae_lib.model import build_model

SHAPE = (3, 16, 12)  # C, H, W: colour and not square
CUDA = torch.device("cuda", 0)


def _model(head: str):
    torch.manual_seed(0)
    model = build_model(TrainConfig.preset("smoke", dataset="synthetic", head=head, device="cpu"), SHAPE).eval()
    if head != "diagonal":  # an untrained P is ~1e-5: give it a size so that edits propagate visibly
        with torch.no_grad():
            model.head.factor_conv.weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1))
    return model


def _image() -> torch.Tensor:
    return torch.rand(SHAPE, generator=torch.Generator().manual_seed(2))


def _operations(ed: E.Editor) -> dict[str, torch.Tensor]:
    """Every operation of the Editor API, in the order a user would call them; the results by name."""
    out = {"mu": ed.mean, "image0": ed.image}
    out["paint1"] = ed.paint([(2, 1), (2, 10)], 0.0, 1)
    out["paint2"] = ed.paint([(4, 3), (12, 3)], (1.0, 0.5, 0.0), 2)
    out["screen"] = ed.screen_stroke([(10.0, 100.0), (70.0, 100.0), (500.0, 5.0)], (96.0, 128.0), 0.3, 1)
    out["mask"], out["values"] = ed.mask, ed.values
    out["samples"] = ed.samples(3, seed=5)
    out["directions"] = ed.directions()
    out["explore"] = ed.explore([1.5, -0.5][:ed.rank])  # the pixel-wise model has R = 0
    out["undo"] = ed.undo()
    out["set_eps"] = ed.set_eps(ed.calibrated)
    out["paint_eps"] = ed.paint([(8, 8)], 1.0, 3)
    out["samples_eps"] = ed.samples(2)
    out["explore_eps"] = ed.explore([-1.0][:ed.rank])
    out["trained"] = ed.set_eps(None)
    out["cond_loc"] = ed.distribution.loc
    out["reset"] = ed.reset()
    out["explore_reset"] = ed.explore([0.5, 0.5][:ed.rank])
    return out


def _check_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, value in got.items():
        assert value.device == CUDA, f"{name} is on {value.device}"
        torch.testing.assert_close(real(value), expected[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("head", ["lowrank", "lowrank-diag", "diagonal"])
def test_editor_operations_on_a_cuda_model_match_the_cpu(head):
    model, x = _model(head), _image()
    calibrated = 2e-3 if head == "lowrank" else 1.5
    expected = _operations(E.Editor(model, image=x, seed=3, calibrated=calibrated))
    expected_prior = E.Editor(model, seed=4).image
    with fake_cuda():
        cuda_model = copy.deepcopy(model).to("cuda")
        got = _operations(E.Editor(cuda_model, image=x, seed=3, calibrated=calibrated))  # x on the CPU: moved
        got_cuda_x = E.Editor(cuda_model, image=x.to("cuda"), seed=3).image
        prior = E.Editor(cuda_model, seed=4).image
    _check_same(got, expected)
    torch.testing.assert_close(real(got_cuda_x), expected["image0"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(real(prior), expected_prior, rtol=1e-5, atol=1e-6)


def _lowrank(shape=SHAPE, rank: int = 4) -> LowRankNormal:
    g = torch.Generator().manual_seed(0)
    d = math.prod(shape)
    return LowRankNormal(0.5 + 0.1 * torch.randn(1, d, generator=g), 0.1 * torch.randn(1, d, rank, generator=g),
                         torch.tensor(1e-3))


@pytest.mark.parametrize("kind", ["lowrank", "diagonal"])
def test_editor_over_a_cuda_distribution_matches_the_cpu(kind):
    if kind == "lowrank":
        cpu = _lowrank()
        move = lambda d: LowRankNormal(d.loc.to("cuda"), d.cov_factor.to("cuda"), d.cov_diag.to("cuda"))  # noqa: E731
    else:
        g = torch.Generator().manual_seed(0)
        cpu = DiagonalNormal(torch.rand(1, math.prod(SHAPE), generator=g),
                             0.01 + torch.rand(1, math.prod(SHAPE), generator=g))
        move = lambda d: DiagonalNormal(d.loc.to("cuda"), d.cov_diag.to("cuda"))  # noqa: E731
    expected = _operations(E.Editor(cpu, image_shape=SHAPE, seed=1, calibrated=0.5))
    with fake_cuda():
        got = _operations(E.Editor(move(cpu), image_shape=SHAPE, seed=1, calibrated=0.5))
    _check_same(got, expected)


def test_a_paint_adds_no_read_back_to_the_conditioning():
    dist = _lowrank()
    with fake_cuda() as mode:
        cuda = LowRankNormal(dist.loc.to("cuda"), dist.cov_factor.to("cuda"), torch.tensor(1e-3, device="cuda"))
        ed = E.Editor(cuda, image_shape=SHAPE)
        mask = E.stroke_pixels([(2, 1), (2, 10)], SHAPE[1:], 1).to("cuda").expand(SHAPE).reshape(1, -1)
        before = mode.syncs
        cuda.condition(mask, torch.zeros(1, mask.shape[-1], device="cuda"))
        condition_syncs = mode.syncs - before
        before = mode.syncs
        ed.paint([(2, 1), (2, 10)], 0.0, 1)
        assert mode.syncs - before == condition_syncs
        before = mode.syncs
        ed.explore([1.0, 0.5])  # the directions of this state are computed once, then cached
        ed.explore([0.5, 0.5])
        explore_syncs = mode.syncs - before
    assert explore_syncs == 0


def _drive_widget(ui: Wd.EditorUI) -> dict[str, bytes]:
    """Every handler the widget's frontend triggers, in a user's order; the canvas bytes after each."""
    out = {"start": ui.canvas.rgba, "start_samples": ui.sample_canvas.rgba}
    ui.width_slider.value = 2
    ui.value_picker.value = "#204080"
    ui._on_canvas_msg(ui.canvas, {"type": "stroke", "points": [[8.0, 8.0], [70.0, 30.0]], "size": [96, 128]})
    out["stroke"], out["mask"], out["samples"] = ui.canvas.rgba, ui.canvas.mask, ui.sample_canvas.rgba
    ui.sample_button.click()
    out["sample_click"] = ui.sample_canvas.rgba
    ui.tabs.selected_index = 1
    ui.sliders[0].value = 1.0
    ui.sliders[1].value = -2.0
    out["sliders"], out["spectrum"] = ui.explore_canvas.rgba, ui.spectrum.value.encode()
    ui.zero_button.click()
    out["zero"] = ui.explore_canvas.rgba
    ui.eps_switch.value = "calibrated"
    out["calibrated"], out["calibrated_sliders"] = ui.canvas.rgba, ui.explore_canvas.rgba
    ui.eps_switch.value = "trained"
    ui.undo_button.click()
    out["undo"], out["undo_mask"] = ui.canvas.rgba, ui.canvas.mask
    ui.tabs.selected_index = 0
    ui._on_canvas_msg(ui.canvas, {"type": "stroke", "points": [[50.0, 60.0]], "size": [96, 128]})
    ui.outline_box.value = False
    out["no_outline"] = ui.canvas.mask
    ui.reset_button.click()
    out["reset"], out["status"] = ui.canvas.rgba, ui.status.value.rsplit("update", 1)[0].encode()
    return out


def test_the_widget_handlers_on_a_cuda_model_match_the_cpu():
    pytest.importorskip("anywidget")
    model, x = _model("lowrank"), _image()
    expected = _drive_widget(Wd.EditorUI(E.Editor(model, image=x, seed=2, calibrated=3e-3), n_samples=2, scale=8))
    with fake_cuda():
        ed = E.Editor(copy.deepcopy(model).to("cuda"), image=x, seed=2, calibrated=3e-3)
        got = _drive_widget(Wd.EditorUI(ed, n_samples=2, scale=8))
    assert expected["mask"] != b"" and expected["stroke"] != expected["start"]
    assert got.keys() == expected.keys()
    for name in got:
        assert got[name] == expected[name], name
