"""``init_from``: a run that starts from another run's encoder, trunk and mean head (a shared mean pre-training).

What is taken (every weight but the observation-noise head), what starts afresh (the noise head from the seed,
Adam, λ for another head), the checks made before any data is loaded, and resume."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import copy_run, smoke_config, train_cli
from sosvae_lib import train as train_mod
from sosvae_lib.runs import Run

SHAPE = (1, 16, 16)


@pytest.fixture(scope="module")
def pretrained(trained_smoke_run):
    """A finished mean pre-training (every epoch pre-trains: P frozen at its initial value), lowrank R=2."""
    return trained_smoke_run(epochs=1, pretrain_epochs=1, target_kl=0.1)


def _noise_names(model) -> set[str]:
    noise = {id(p) for p in model.noise_parameters()}
    return {name for name, p in model.named_parameters() if id(p) in noise}


@pytest.mark.parametrize("head", ["lowrank", "diagonal", "lowrank-diag"])
def test_a_new_run_takes_every_weight_but_the_noise_head_and_keeps_a_fresh_optimiser(pretrained, head):
    source = Run(pretrained).checkpoint()
    config = smoke_config(head=head, init_from=str(pretrained), seed=3)
    run = train_mod.setup_run(config, SHAPE, init=source)
    fresh = train_mod.setup_run(config.replace(init_from=None), SHAPE)  # the same seed, nothing taken
    noise = _noise_names(run.model)
    assert noise, "every head has an observation-noise part"
    state = run.model.state_dict()
    taken = 0
    for name, value in state.items():
        if name in noise:  # from the seed, as in a run without init_from
            assert torch.equal(value, fresh.model.state_dict()[name]), name
        else:
            assert torch.equal(value, source["model"][name]), name
            taken += 1
    assert taken > 10
    # the taken weights really differ from the seed's (the test would pass vacuously otherwise)
    changed = [k for k in state if k not in noise and state[k].is_floating_point()
               and not torch.equal(state[k], fresh.model.state_dict()[k])]
    assert any(k.startswith("encoder") for k in changed) and any(k.startswith("head") for k in changed), changed
    assert run.optimizer.state_dict()["state"] == {}
    expected_lambda = source["lambda"] if head == "lowrank" else 0.0
    assert source["lambda"] > 0
    assert run.objective.lam == pytest.approx(expected_lambda, abs=0)
    assert run.init_digest == source["weights_sha256"]


def test_training_from_a_pretraining_records_it_and_resumes_bit_for_bit(pretrained, tmp_path):
    config = smoke_config(init_from=str(pretrained), epochs=2, pretrain_epochs=0)
    whole = train_mod.train(config, tmp_path / "whole", progress=False)
    src_digest = Run(pretrained).summary()["weights_sha256"]
    assert whole["init_from_weights_sha256"] == src_digest
    assert Run(tmp_path / "whole").config.init_from == str(pretrained.resolve())

    train_mod.train(config.replace(epochs=1), tmp_path / "split", progress=False)
    resumed = train_mod.train(config, tmp_path / "split", resume=True, progress=False)
    assert resumed["weights_sha256"] == whole["weights_sha256"]
    assert resumed["init_from_weights_sha256"] == src_digest
    # and it differs from the same run without the pre-training
    plain = train_mod.train(config.replace(init_from=None), tmp_path / "plain", progress=False)
    assert plain["weights_sha256"] != whole["weights_sha256"]


def test_a_relative_init_from_is_stored_absolute(pretrained, tmp_path, monkeypatch):
    monkeypatch.chdir(pretrained.parent)
    config = smoke_config(init_from=pretrained.name)
    train_mod.train(config, tmp_path / "rel", progress=False)
    stored = json.loads((tmp_path / "rel" / "config.json").read_text())["init_from"]
    assert stored == str(pretrained.resolve())


def _bad(tmp_path, pretrained, kind):
    if kind == "missing":
        return smoke_config(init_from=str(tmp_path / "nowhere")), "holds no run"
    if kind == "partial":
        part = copy_run(pretrained, tmp_path / "part")
        (part / "summary.json").unlink()
        return smoke_config(init_from=str(part)), "unfinished"
    if kind == "latent":
        return smoke_config(init_from=str(pretrained), latent=5), "latent="
    if kind == "image_size":
        return smoke_config(init_from=str(pretrained), image_size=24), "image_size="
    if kind == "itself":
        return smoke_config(init_from=str(tmp_path / "out")), "is the run being trained"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "partial", "latent", "image_size", "itself"])
def test_a_bad_source_is_refused_naming_init_from_before_anything_is_written(pretrained, tmp_path, kind,
                                                                              monkeypatch):
    config, words = _bad(tmp_path, pretrained, kind)
    if kind == "itself":
        copy_run(pretrained, tmp_path / "out")
        (tmp_path / "out" / "checkpoint.pt").unlink()  # a folder with a config but no checkpoint: a new run
    loads = []
    monkeypatch.setattr(train_mod, "_load_train_set", lambda c: loads.append(c))
    before = sorted(p.name for p in (tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else None
    with pytest.raises(ValueError, match="init_from") as err:
        train_mod.train(config, tmp_path / "out", progress=False)
    assert words in str(err.value)
    assert loads == [], "the source is checked before any data is loaded"
    after = sorted(p.name for p in (tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else None
    assert after == before


def test_init_from_must_be_a_path_string():
    with pytest.raises(ValueError, match="init_from"):
        smoke_config(init_from=3)
    with pytest.raises(ValueError, match="init_from"):
        smoke_config(init_from="")


def test_the_command_line_takes_init_from(pretrained, tmp_path, capsys):
    rc, out, err = train_cli(capsys, "--config", "smoke", "--dataset", "orl", "--device", "cpu", "--no-progress",
                             "--out", str(tmp_path / "cli"), "--init-from", str(pretrained))
    assert rc == 0, err
    assert Run(tmp_path / "cli").summary()["init_from_weights_sha256"] == Run(pretrained).summary()["weights_sha256"]
    rc, out, err = train_cli(capsys, "--config", "smoke", "--dataset", "orl", "--device", "cpu", "--no-progress",
                             "--out", str(tmp_path / "cli2"), "--init-from", str(tmp_path / "nothing"))
    assert rc == 2 and "init_from" in err and len(err.strip().splitlines()) == 1
