"""Known-answer tests of the figure computations (`sosvae_lib.components`, `sosvae_lib.editing`), the figures (`sosvae_lib.plots`), the
metrics table (`sosvae_lib.tables`) and the plan of `sosvae_lib.reproduce`, on hand-built distributions small
enough for dense float64 references."""

from __future__ import annotations

import json
import math

import pytest
import torch
from matplotlib.figure import Figure

from sosvae_lib import components as C
from sosvae_lib import editing as Ed
from sosvae_lib import plots, reproduce, tables
from sosvae_lib.distributions import DiagonalNormal, LowRankNormal

torch.set_num_threads(1)
SHAPE = (1, 8, 8)
D = 64


def _lowrank(rank: int = 3, seed: int = 0, batch: tuple[int, ...] = (1,), dtype=torch.float64) -> LowRankNormal:
    g = torch.Generator().manual_seed(seed)
    loc = 0.5 + 0.1 * torch.randn(batch + (D,), generator=g, dtype=dtype)
    factor = 0.1 * torch.randn(batch + (D, rank), generator=g, dtype=dtype)
    return LowRankNormal(loc, factor, torch.full(batch + (D,), 1e-3, dtype=dtype))


def _dense(dist: LowRankNormal) -> torch.Tensor:
    p = dist.cov_factor.reshape(D, -1).double()
    return p @ p.T + torch.diag(torch.broadcast_to(dist.cov_diag, dist.loc.shape).reshape(D).double())


class FakeModel(torch.nn.Module):
    """decode(z) = N(μ(z), P(z)P(z)ᵀ + d) with a linear μ and a z-scaled fixed P; encode(x) = N(0.1·mean(x), 1)."""

    def __init__(self, rank: int = 3, latent: int = 4, diagonal: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.image_shape, self.latent_dim, self.diagonal = SHAPE, latent, diagonal
        self.rank = 0 if diagonal else rank
        self.w = torch.nn.Parameter(0.1 * torch.randn(latent, D, generator=g))
        self.register_buffer("p", 0.1 * torch.randn(D, rank, generator=g))

    def decode(self, z: torch.Tensor):
        loc = 0.5 + z @ self.w
        if self.diagonal:
            return DiagonalNormal(loc, torch.full_like(loc, 0.01))
        return LowRankNormal(loc, self.p * (1 + 0.1 * z[:, :1, None]), torch.tensor(1e-4))

    def encode(self, x: torch.Tensor):
        m = 0.1 * x.reshape(x.shape[0], -1).mean(-1, keepdim=True).expand(-1, self.latent_dim)
        return torch.distributions.Normal(m, torch.ones_like(m))


# ------------------------------------------------------------------------------------------------------------
def test_principal_directions_match_dense_eigendecomposition():
    dist = _lowrank(rank=4)
    p = dist.cov_factor.reshape(D, 4)
    w, v, u = C.principal_directions(p)
    dense_w, dense_u = torch.linalg.eigh(p @ p.T)
    torch.testing.assert_close(w, dense_w.flip(0)[:4], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(u.T @ u, torch.eye(4, dtype=torch.float64), atol=1e-10, rtol=0)
    for j in range(4):  # each u_j is the dense eigenvector up to sign
        assert abs(float(u[:, j] @ dense_u[:, -1 - j])) == pytest.approx(1.0, abs=1e-8)
        torch.testing.assert_close(p @ v[:, j], math.sqrt(float(w[j])) * u[:, j], atol=1e-12, rtol=0)


def test_principal_directions_of_rank_deficient_factor_are_zero_not_nan():
    p = torch.zeros(D, 3, dtype=torch.float64)
    p[:, 0] = 1.0
    w, _, u = C.principal_directions(p)
    assert torch.isfinite(u).all()
    torch.testing.assert_close(w, torch.tensor([float(D), 0.0, 0.0], dtype=torch.float64))


def test_component_sweeps_move_along_columns_and_principal_directions():
    dist = _lowrank(rank=3)
    ts = torch.tensor([-3.0, 0.0, 2.0])
    s = C.component_sweeps(dist, SHAPE, ts=ts)
    p = dist.cov_factor.reshape(D, 3)
    loc = dist.loc.reshape(D)
    assert s.columns.shape == (3, 3, D) and s.principal.shape == (3, 3, D)
    norms = p.norm(dim=0)
    assert s.column_order == torch.argsort(norms, descending=True).tolist()
    for i, j in enumerate(s.column_order):
        for k, t in enumerate(ts.tolist()):
            torch.testing.assert_close(s.columns[i, k], loc + t * p[:, j], atol=1e-10, rtol=0)
    w, _, u = C.principal_directions(p)
    torch.testing.assert_close(s.principal[0, 2], loc + 2.0 * math.sqrt(float(w[0])) * u[:, 0], atol=1e-10, rtol=0)
    summary = s.summary()
    assert summary["trace_error"] < 1e-12 and summary["orthonormality_error"] < 1e-10
    assert summary["eigenvalues"] == sorted(summary["eigenvalues"], reverse=True)
    assert 1 / 3 <= summary["top_fraction"] <= 1
    assert C.component_sweeps(dist, SHAPE, max_components=2).principal.shape[0] == 2


def test_component_sweeps_reject_a_rank_zero_distribution():
    with pytest.raises(ValueError, match="dist: has no covariance factor"):
        C.component_sweeps(DiagonalNormal(torch.zeros(1, D), torch.ones(1, D)), SHAPE)


def test_lerp_and_slerp():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(16, generator=g), torch.randn(16, generator=g)
    z1 = z1 * z0.norm() / z1.norm()
    t = torch.linspace(0, 1, 5)
    for f in (C.lerp, C.slerp):
        path = f(z0, z1, t)
        torch.testing.assert_close(path[0], z0)
        torch.testing.assert_close(path[-1], z1, atol=1e-6, rtol=0)
    # slerp between equal-norm codes stays on the sphere; lerp cuts through it
    torch.testing.assert_close(C.slerp(z0, z1, t).norm(dim=-1), z0.norm().expand(5), atol=1e-5, rtol=0)
    assert float(C.lerp(z0, z1, t).norm(dim=-1)[2]) < float(z0.norm()) - 1e-3
    torch.testing.assert_close(C.slerp(z0, z0, t), z0.expand(5, -1))  # Ω = 0: falls back to lerp


def test_edit_strokes_paint_a_line_in_every_channel():
    g = torch.Generator().manual_seed(0)
    rgb = LowRankNormal(torch.rand(1, 300, generator=g), 0.1 * torch.randn(1, 300, 2, generator=g), torch.tensor(0.01))
    m = Ed.edit_strokes(rgb, (3, 10, 10), [((0.5, 0.0), (0.5, 1.0))]).masks[-1]
    grid = m.reshape(3, 10, 10)
    assert grid.sum() == 30 and grid[:, 4].all()  # row 0.5·(10 − 1) = 4.5 rounds (to even) to 4
    assert (grid[0] == grid[2]).all()
    assert Ed.edit_strokes(rgb, (3, 10, 10), [((0.5, 0.5),)], width=3).masks[-1].sum() == 3 * 9
    with pytest.raises(ValueError, match="points"):
        Ed.edit_strokes(rgb, (3, 10, 10), [((1.5, 0.5),)])
    with pytest.raises(ValueError, match="strokes"):
        Ed.edit_strokes(rgb, (3, 10, 10), [])


def test_edit_strokes_propagate_by_the_dense_conditional_and_not_for_diagonal():
    dist = _lowrank(rank=3)
    edit = Ed.edit_strokes(dist, SHAPE, value=0.0)
    mask = edit.masks[-1]
    sigma = _dense(dist)
    mu = dist.loc.reshape(D)
    o, u = mask, ~mask
    values = torch.zeros(int(o.sum()), dtype=torch.float64)
    expected = mu[u] + sigma[u][:, o] @ torch.linalg.solve(sigma[o][:, o], values - mu[o])
    torch.testing.assert_close(edit.after[-1][u], expected, atol=1e-8, rtol=1e-6)
    assert (edit.after[-1][o] == 0).all()
    assert edit.masks[0].sum() < edit.masks[1].sum() and (edit.masks[0] <= edit.masks[1]).all()
    assert edit.summary()["propagated_rms"] > 1e-3
    diag = DiagonalNormal(dist.loc, torch.full_like(dist.loc, 0.01))
    s = Ed.edit_strokes(diag, SHAPE).summary()
    assert s["propagated_rms"] == 0.0 and s["propagated_max"] == 0.0 and s["stroke_pixels"] == float(mask.sum())


def test_patch_completions_keep_the_patch_and_match_the_conditional_mean():
    dist = _lowrank(rank=3)
    x = dist.from_noise(torch.randn(3, dtype=torch.float64), torch.randn(D, dtype=torch.float64)).reshape(D)
    comp = Ed.patch_completions(dist, x, SHAPE, top=2, left=3, size=4, n=50, seed=0)
    assert comp.mask.sum() == 16 and comp.samples.shape == (50, D)
    s = comp.summary()
    assert s["patch_error"] == 0.0
    assert s["rmse_cond"] < s["rmse_uncond"]  # x was drawn from dist: revealing part of it helps
    torch.testing.assert_close(comp.samples.mean(0), comp.cond_mean, atol=0.05, rtol=0)
    diag = DiagonalNormal(dist.loc, torch.full_like(dist.loc, 0.01))
    d = Ed.patch_completions(diag, x, SHAPE, 2, 3, 4, n=3).summary()
    assert d["rmse_cond"] == pytest.approx(d["rmse_uncond"], abs=1e-12)
    with pytest.raises(ValueError, match="top, left"):
        Ed.patch_completions(dist, x, SHAPE, top=6, left=0, size=4)


def test_object_pixel_picks_the_most_uncertain_central_pixel():
    v = torch.zeros(2, 1, 8, 8)
    v[:, 0, 0, 0] = 100.0  # outside the central box: ignored
    v[:, 0, 3, 5] = 1.0
    assert C.object_pixel(v.reshape(2, -1), SHAPE) == 3 * 8 + 5


def test_prior_panel_rows_and_summary():
    model = FakeModel()
    p = C.prior_panel(model, n=4, seed=3)
    z = torch.randn(4, 4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(p.z, z)
    dist = model.decode(z)
    torch.testing.assert_close(p.mean, dist.loc)
    torch.testing.assert_close(p.cov_pos - p.cov_neg, dist.covariance_row(p.pixel))
    assert (p.cov_pos >= 0).all() and (p.cov_neg >= 0).all()
    s = p.summary()
    assert s["cov_self_error"] < 1e-6 and 0.5 < s["cov_offdiag_fraction"] <= 1
    d = C.prior_panel(FakeModel(diagonal=True), n=4, seed=3, pixel=p.pixel).summary()
    assert d["cov_offdiag_fraction"] == 0.0 and abs(d["residual_corr"]) < 0.3
    panels = C.prior_panels({"lowrank": model, "diagonal": FakeModel(diagonal=True)}, n=2)
    assert panels["lowrank"].pixel == panels["diagonal"].pixel


def test_interpolate_uses_fixed_noise():
    it = C.interpolate(FakeModel(), steps=5, seed=1)
    s = it.summary()
    assert s["endpoint_error"] < 1e-6 and s["slerp_norm_ratio"] > s["lerp_norm_ratio"] - 1e-6
    # same noise along the row: sample − mean changes only through P(z)
    diff = it.samples["lerp"] - it.means["lerp"]
    assert torch.corrcoef(torch.stack([diff[0], diff[-1]]))[0, 1] > 0.9


def test_editors_share_the_revealed_square():
    x = torch.rand(SHAPE)
    out = Ed.edit_panels({"lowrank": FakeModel(), "diagonal": FakeModel(diagonal=True)}, x, patch=4, n=2)
    assert torch.equal(out["lowrank"][1].mask, out["diagonal"][1].mask)
    assert out["diagonal"][0].summary()["propagated_rms"] == 0.0


# ------------------------------------------------------------------------------------------------------------
def test_figures_are_built_with_the_documented_layout(tmp_path):
    models = {"lowrank": FakeModel(), "diagonal": FakeModel(diagonal=True)}
    fig = plots.samples_figure(models, n=3)
    assert isinstance(fig, Figure) and sum(len(s.axes) for s in fig.subfigs) == 2 * 6 * 3
    fig = plots.editor_figure(Ed.edit_panels(models, torch.rand(SHAPE), patch=4, n=2))
    assert sum(len(s.axes) for s in fig.subfigs) == 2 * 2 * 5
    sessions = {k: Ed.scripted_session(Ed.Editor(m, seed=0), n_samples=2) for k, m in models.items()}
    assert len(plots.session_figure(sessions).axes) == 2 * (1 + 2 * 2 + 2)  # μ, 2 × (stroke, change), 2 samples
    sweeps = C.component_sweeps(C.prior_mode(models["lowrank"]), SHAPE)
    assert len(plots.sweeps_figure(sweeps, "columns").axes) == 3 * 8
    with pytest.raises(ValueError, match="kind"):
        plots.sweeps_figure(sweeps, "rows")
    assert sum(len(s.axes) for s in plots.interpolation_figure(models, steps=4).subfigs) == 2 * 4 * 4
    from sosvae_lib import inpaint as I
    x = torch.rand(SHAPE)
    panel = I.inpaint_panel(x, I.figure_masks(SHAPE, 4), x.mean(), models, pca=_lowrank(batch=()), num_samples=2)
    fig = plots.real_inpainting_figure(panel, "t")
    assert len(fig.axes) == 3 * (2 + 3 + 2)  # per mask: truth, given, PPCA + 2 models, 2 samples
    assert [ax.get_title() for ax in fig.axes[:7]] == ["truth", "given"] + [
        f"{m}\n{panel['top_half'].rmse[m]:.3f}" for m in ("PPCA", "lowrank", "diagonal")] + [
        "diagonal sample 1", "diagonal sample 2"]
    with pytest.raises(ValueError, match="rows"):
        plots.real_inpainting_figure({})
    hist = [dict(epoch=e, nll_bpd=9.0 - e, kl=e, target_kl=5.0, **{"lambda": 0.1 * e}) for e in (1, 2, 3)]
    assert len(plots.training_curves_figure({"a": hist}).axes) == 3
    rows = [dict(dataset="orl", head=h, rank=r, test_nll_bpd=5.0 - 0.1 * r, residual_corr_samples=0.5,
                 residual_corr_data=0.6, span_capture=0.1 * r) for h, r in (("lowrank", 1), ("lowrank", 5),
                                                                          ("diagonal", 25), ("pca", 5))]
    fig = plots.metrics_vs_rank_figure(rows)
    paths = plots.save_figure(fig, tmp_path / "sub" / "m")
    assert [p.name for p in paths] == ["m.png", "m.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[1].read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["m.pdf", "m.png"]  # no temporary files left
    with pytest.raises(ValueError, match="formats"):
        plots.save_figure(fig, tmp_path / "x", formats=("gif",))


def test_load_history_reads_the_trainers_csv(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch,nll_bpd,kl,target_kl,lambda\n1,9.5,3.0,5.0,0.0\n2,8.5,4.0,5.0,nan\n")
    rows = plots.load_history(tmp_path)
    assert rows[1]["nll_bpd"] == 8.5 and math.isnan(rows[1]["lambda"])
    with pytest.raises(FileNotFoundError, match="run_dir"):
        plots.load_history(tmp_path / "none")


# ------------------------------------------------------------------------------------------------------------
def _eval_result(head: str, rank: int) -> dict:
    base = {k: 0.5 for k in tables.COLUMNS if k not in ("dataset", "head", "rank")}
    out = dict(base, dataset="orl", head=head, rank=rank if head != "diagonal" else 0, latent=4, epochs=1)
    out.update({f"pca_{k}": 0.25 for k in base}, pca_rank=rank)
    return out


def test_tables_collect_deduplicate_and_write(tmp_path):
    for name, head, rank in (("a", "lowrank", 2), ("b", "diagonal", 2), ("c", "lowrank", 1), ("d", "lowrank", 5)):
        (tmp_path / name).mkdir()
        if name != "d":  # d is not evaluated
            (tmp_path / name / "eval_test.json").write_text(json.dumps(_eval_result(head, rank)))
    rows = tables.collect_rows(tmp_path)
    assert [(r["head"], r["rank"]) for r in rows] == [("lowrank", 1), ("lowrank", 2), ("diagonal", 0),
                                                        ("pca", 1), ("pca", 2)]
    paths = tables.write_tables(rows, tmp_path / "t")
    header = paths["csv"].read_text().splitlines()[0].split(",")
    assert tuple(header[:len(tables.COLUMNS)]) == tables.COLUMNS
    md = paths["md"].read_text().splitlines()
    assert len(md) == 2 + len(rows) and md[2].startswith("| orl | lowrank | 1 | 0.5000 |")
    head = tables.headline(rows)["orl"]
    assert head["lowrank"]["rank"] == 2 and head["pca"]["rank"] == 2 and head["diagonal"]["head"] == "diagonal"


# ------------------------------------------------------------------------------------------------------------
def test_plan_per_scale():
    assert [v.name for v in reproduce.plan("smoke")] == ["orl-lowrank-r1", "orl-lowrank-r2", "orl-diagonal"]
    cpu = reproduce.plan("cpu")
    assert [v.name for v in cpu] == ["orl-lowrank-r5", "orl-lowrank-r25", "orl-diagonal",
                                     "orl-lowrank-diag-r25", "fashion-mnist-lowrank-r25", "fashion-mnist-diagonal",
                                     "celeba-pretrain", "celeba-lowrank-r25", "celeba-lowrank-diag-r25",
                                     "celeba-diagonal"]
    assert [v.name for v in cpu if v.main] == ["orl-lowrank-r25", "fashion-mnist-lowrank-r25", "celeba-lowrank-r25"]
    assert sum(v.minutes for v in cpu) <= 48  # training at ~100 s per CelebA epoch (74 measured idle); evaluation
    # and notebooks took ~5 of the 60 minutes
    # celeba: one shared mean pre-training (6 epochs), then 5 epochs of each head started from it
    pre, *heads = [v for v in cpu if v.dataset == "celeba"]
    assert pre.pretrain and pre.config().epochs == pre.config().pretrain_epochs == 6
    assert {v.head for v in heads} == {"lowrank", "lowrank-diag", "diagonal"}
    for v in heads:
        c = v.config(None, "/r/runs")
        assert c.max_items is None and c.epochs == 5 and c.pretrain_epochs == 0
        assert c.init_from == "/r/runs/celeba-pretrain" and c.target_kl == 10.0 and pre.config().target_kl == 15.0
        assert c.replace(init_from=None, pretrain_epochs=6, epochs=6, head="lowrank", target_kl=15.0) == pre.config()
    for v in cpu:  # every planned configuration is valid
        c = v.config()
        assert c.dataset == v.dataset and c.head == v.head
    assert reproduce.plan("cpu", folder_root="/x")[-1].name == "folder-diagonal"
    assert reproduce.plan("paper")[0].config().image_size == (218, 178)
    assert [v.name for v in reproduce.select(cpu, "celeba,orl-diagonal")] == ["orl-diagonal", "celeba-pretrain",
                                                                             "celeba-lowrank-r25",
                                                                             "celeba-lowrank-diag-r25",
                                                                             "celeba-diagonal"]
    # a head alone brings the pre-training it starts from
    assert [v.name for v in reproduce.select(cpu, "celeba-diagonal")] == ["celeba-pretrain", "celeba-diagonal"]
    with pytest.raises(ValueError, match="only: unknown name 'mnist'"):
        reproduce.select(cpu, "mnist")
    with pytest.raises(ValueError, match="scale"):
        reproduce.plan("huge")


def test_absent_data_is_a_skip_line_not_a_crash(tmp_path, capsys):
    reason = reproduce.data_available("celeba", str(tmp_path / "nowhere"))
    assert reason and "celeba" in reason and "\n" not in reason
    status = reproduce.reproduce("cpu", out=tmp_path, only="folder", folder_root=str(tmp_path / "nowhere"))
    assert status["failed"] == [] and len(status["skipped"]) == 1 and "folder: data not found" in status["skipped"][0]
    out = capsys.readouterr().out
    assert "skip folder: data not found" in out
    assert "Skipped" in (tmp_path / "cpu" / "README.md").read_text()


def test_command_line_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        reproduce.main(["--scale", "huge"])
    with pytest.raises(SystemExit):
        reproduce.main(["--scale", "smoke", "--only", "nothing"])
    assert "only: unknown name 'nothing'" in capsys.readouterr().err


def test_table_cells_keep_significant_zeros():
    # a rounded value must not look exact (6.99991 is not "7"), and no trailing decimal point
    assert [tables.format_cell(v) for v in (6.99991, 1208.3, 0.0004045, 0.5, 0.0, 123456.0, None, 3)] == \
        ["7.000", "1208", "4.045e-04", "0.5000", "0.000", "1.235e+05", "", "3"]
    assert tables.format_cell(float("nan")) == "nan"


def test_real_inpainting_rows_compare_the_headline_lowrank_run_with_pca_and_the_training_mean():
    fam = tables.REAL_INPAINT_FAMILIES
    low = dict(dataset="orl", head="lowrank", rank=5, **{f"real_inpaint_rmse_{f}": 0.1 * (i + 1) for i, f in enumerate(fam)},
               **{f"real_inpaint_rmse_{f}_train_mean": 0.25 for f in fam})
    small = dict(low, rank=1, **{f"real_inpaint_rmse_{f}": 0.0 for f in fam})  # not the headline run
    pca = dict(dataset="orl", head="pca", rank=5, **{f"real_inpaint_rmse_{f}": 0.15 for f in fam})
    diag = dict(dataset="orl", head="diagonal", rank=0, **{f"real_inpaint_rmse_{f}": 0.3 for f in fam})
    rows = tables.real_inpainting_rows([small, low, pca, diag])
    assert [r["mask"] for r in rows] == list(fam)
    assert [(r["lowrank"], r["pca"], r["diagonal"], r["train_mean"]) for r in rows][1] == (0.2, 0.15, 0.3, 0.25)
    assert [r["beats_pca"] for r in rows] == [True, False, False, False]
    assert [r["beats_train_mean"] for r in rows] == [True, True, False, False]
    del pca["real_inpaint_rmse_top_half"]
    assert tables.real_inpainting_rows([low, pca])[0]["beats_pca"] is None
    md = tables.to_markdown(rows, tables.REAL_INPAINT_TABLE_COLUMNS).splitlines()
    assert md[2] == "| orl | top_half | 0.1000 | 0.1500 | 0.3000 | 0.2500 | True | True |"
