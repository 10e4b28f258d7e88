"""CUDA semantics of the figure computations (`sosvae_lib.components`) and of the figures built from a model
(`sosvae_lib.plots`), proved on the CPU: a smoke-sized model of each head is moved to ``cuda`` inside `fake_cuda`
(tests/fake_cuda.py), every public computation runs on it, and every number (and every image a figure shows) must
equal the CPU run. A CPU tensor meeting a CUDA one, a CPU generator feeding a CUDA draw, or ``.numpy()`` on a
device tensor fails the test, as it would fail on a GPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from matplotlib.figure import Figure

from fake_cuda import ClaimedCuda, fake_cuda, real
from sosvae_lib import components as C
from sosvae_lib import editing as Ed
from sosvae_lib import plots
from sosvae_lib.config import TrainConfig
from sosvae_lib.model import build_model

SHAPE = (3, 16, 16)
HEADS = ("lowrank", "lowrank-diag", "diagonal")


def _model(head: str):
    config = TrainConfig.preset("smoke", dataset="synthetic", head=head, device="cpu", seed=0)
    torch.manual_seed(0)
    return build_model(config, SHAPE).eval()


def _image() -> torch.Tensor:
    return torch.rand(SHAPE, generator=torch.Generator().manual_seed(3))


def _computations(model, x: torch.Tensor, device: str) -> dict:
    """Every public computation of components.py and of the editing figure (editing.py) on ``model`` (its results,
    summaries included)."""
    out: dict = {}
    out["prior_panel"] = C.prior_panel(model, n=3, seed=1)
    out["prior_panels"] = C.prior_panels({"a": model, "b": model}, n=2, seed=2)
    dist = C.reconstruction(model, x)
    out["reconstruction"] = (dist.loc, dist.variance, dist.cov_factor)
    mode = C.prior_mode(model)
    out["prior_mode"] = (mode.loc, mode.variance)
    out["draw_noise"] = C.draw_noise(dist, 2, 4)
    out["object_pixel"] = C.object_pixel(dist.variance, SHAPE)
    out["edit"] = Ed.edit_strokes(dist, SHAPE)
    out["completions"] = Ed.patch_completions(dist, x.to(device), SHAPE, 2, 3, size=4, n=3, seed=5)
    out["editor"] = Ed.edit_panel(model, x, patch=4, n=2, seed=6)
    out["editors"] = Ed.edit_panels({"a": model, "b": model}, x.to(device), patch=4, n=2, seed=7)
    if dist.cov_factor.shape[-1]:
        out["principal_directions"] = C.principal_directions(dist.cov_factor)
        out["sweeps"] = C.component_sweeps(dist, SHAPE)
        out["sweeps_2"] = C.component_sweeps(dist, SHAPE, ts=[-1.0, 0.0, 2.0], max_components=1)
    else:
        with pytest.raises(ValueError, match="rank 0"):
            C.component_sweeps(dist, SHAPE)
    out["interpolate"] = C.interpolate(model, steps=3, seed=8)
    g = torch.Generator(device=device).manual_seed(9)
    z0, z1 = torch.randn(2, model.latent_dim, generator=g, device=device)
    out["interpolate_given"] = C.interpolate(model, steps=3, z0=z0, z1=z1)
    t = torch.linspace(0, 1, 4)
    out["lerp"], out["slerp"] = C.lerp(z0, z1, t), C.slerp(z0, z1, t)
    return out


def _leaves(obj, path: str = "") -> dict:
    """Flatten results (dataclasses with their summary(), tuples, dicts) into path → tensor or number."""
    if dataclasses.is_dataclass(obj):
        out = {f"{path}.summary": obj.summary()}
        for f in dataclasses.fields(obj):
            out.update(_leaves(getattr(obj, f.name), f"{path}.{f.name}"))
        return out
    if isinstance(obj, (tuple, list)) and not all(isinstance(v, (int, float)) for v in obj):
        return {k: v for i, item in enumerate(obj) for k, v in _leaves(item, f"{path}[{i}]").items()}
    if isinstance(obj, dict):
        return {k: v for name, item in obj.items() for k, v in _leaves(item, f"{path}[{name}]").items()}
    return {path: obj}


def _compare(got: dict, expected: dict) -> None:
    got, expected = _leaves(got), _leaves(expected)
    assert got.keys() == expected.keys()
    for name, value in got.items():
        ref = expected[name]
        if isinstance(ref, torch.Tensor):
            assert isinstance(value, torch.Tensor) and value.dtype == ref.dtype and value.shape == ref.shape, name
            torch.testing.assert_close(real(value), ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
        elif isinstance(ref, dict):
            assert value.keys() == ref.keys(), name
            for k in ref:
                assert value[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-5), f"{name}[{k}]"
        else:
            assert value == pytest.approx(ref, rel=1e-4, abs=1e-5), name


@pytest.mark.parametrize("head", HEADS)
def test_every_component_computation_runs_on_a_cuda_model_and_equals_the_cpu_run(head):
    model, x = _model(head), _image()
    with torch.no_grad():
        expected = _computations(model, x, "cpu")
    with fake_cuda():
        model.to("cuda")  # Module.to moves the module itself (the CPU numbers are computed above)
        assert next(model.parameters()).device.type == "cuda"
        got = _computations(model, x, "cuda")
    _compare(got, expected)
    # a distribution stays on the model's device; what the figures and summaries read is on the CPU
    assert all(isinstance(t, ClaimedCuda) for t in got["reconstruction"] + got["prior_mode"] + got["draw_noise"])
    for name, value in _leaves({k: v for k, v in got.items() if dataclasses.is_dataclass(v)}).items():
        assert not isinstance(value, ClaimedCuda), f"{name} is left on the device"


def _figure_images(fig: Figure) -> list:
    return [im.get_array() for ax in fig.axes for im in ax.get_images()]


def _figures(model, x: torch.Tensor) -> list[Figure]:
    """The figures of plots.py built from a model (directly, or from the components results they accept)."""
    models = {"m": model}
    figures = [plots.samples_figure(models, n=2, seed=1), plots.interpolation_figure(models, steps=3, seed=2),
               plots.editor_figure(Ed.edit_panels(models, x, patch=4, n=1, seed=3))]
    if model.head.rank:
        figures.append(plots.sweeps_figure(C.component_sweeps(C.prior_mode(model), SHAPE, ts=[-2.0, 2.0]),
                                           kind="columns"))
    return figures


@pytest.mark.parametrize("head", ["lowrank", "diagonal"])
def test_the_figures_of_a_cuda_model_show_the_cpu_images(head):
    model, x = _model(head), _image()
    expected = [_figure_images(f) for f in _figures(model, x)]
    with fake_cuda():
        model.to("cuda")
        got = [_figure_images(f) for f in _figures(model, x)]
    assert len(got) == len(expected) == (4 if head == "lowrank" else 3)
    for g, e in zip(got, expected):
        assert len(g) == len(e) > 0
        for a, b in zip(g, e):
            torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-4, atol=1e-5)
