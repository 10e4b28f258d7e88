"""The benchmarks' argument handling and plans (Langley et al., TMLR 2022, reproduced): what a CUDA run would do is
checked here without a GPU; the measurements themselves live in benchmarks/ and never run as tests."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sosvae_lib import reproduce
from sosvae_lib.config import EvalConfig

REPO = Path(__file__).resolve().parents[1]


def _bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_train_plan_on_the_cpu():
    bench = _bench_train()
    todo = bench.plan(bench.build_parser().parse_args([]))
    assert todo["device"] == torch.device("cpu")
    assert todo["variants"] == ["sosvae-fp32", "sosvae-bf16", "reference"]
    assert todo["configs"]["paper"] == {"batch": 4, "shape": (3, 218, 178), "arch": "authors", "latent": 128,
                                        "rank": 25}
    assert todo["configs"]["cpu"]["batch"] == 25 and todo["out"].endswith("results_train.txt")


def test_bench_train_plan_for_cuda_without_a_gpu(monkeypatch):
    bench = _bench_train()
    monkeypatch.setattr(bench, "resolve_device", lambda name: torch.device("cuda", 0))
    todo = bench.plan(bench.build_parser().parse_args(["--device", "cuda", "--configs", "paper"]))
    assert todo["configs"] == {"paper": {"batch": 25, "shape": (3, 218, 178), "arch": "authors", "latent": 128,
                                         "rank": 25}}
    assert todo["out"].endswith("results_train_cuda.txt")


@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda:3"], "error: device: 'cuda:3' was asked for but"),
    (["--precisions", "fp16"], "error: precisions: must be among fp32, bf16, got 'fp16'"),
    (["--configs", "huge"], "error: configs: unknown config 'huge' (known: paper, cpu)"),
    (["--steps", "0"], "error: steps, threads, batch: must be integers >= 1"),
])
def test_bench_train_bad_arguments(argv, message):
    if torch.cuda.device_count() > 3 and argv[0] == "--device":
        pytest.skip("this machine has a cuda:3")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--plan", *argv],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith(message), proc.stderr


def test_gpu_reproduction_plan():
    variants = reproduce.plan("gpu")
    names = [v.name for v in variants]
    assert len(names) == len(set(names)) == 16
    celeba = [v for v in variants if v.group == "celeba" and not v.pretrain]
    assert sorted(v.rank for v in celeba if v.head == "lowrank") == [1, 5, 10, 25, 50]
    assert {v.head for v in celeba} == {"lowrank", "lowrank-diag", "diagonal"}
    # each CelebA group: one shared mean pre-training of 10 epochs, then 30 epochs per head started from it
    for group in ("celeba", "celeba109x89"):
        pre, *heads = [v for v in variants if v.group == group]
        assert pre.pretrain and pre.name == f"{group}-pretrain" and pre.config().pretrain_epochs == 10
        assert all(h.init_from == pre.name and h.config().epochs == 30 and h.config().pretrain_epochs == 0
                   for h in heads)
    assert not any(v.init_from or v.pretrain for v in variants if v.group in ("orl", "fashion-mnist"))
    assert [v.name for v in variants if v.main] == ["celeba-lowrank-r25", "celeba109x89-lowrank-r25",
                                                     "orl-lowrank-r25", "fashion-mnist-lowrank-r25"]
    for v in variants:
        c = v.config()
        assert c.latent == 128 and c.data_on_device and c.device == "auto" and c.precision == "auto"
        assert c.image_size == {"celeba": 64, "celeba109x89": (109, 89), "orl": 64, "fashion-mnist": 32}[v.group]
        assert c.max_items is None  # whole training splits
    assert reproduce.select(variants, "celeba109x89") == [v for v in variants if v.group == "celeba109x89"]
    assert EvalConfig.preset("gpu").device == "auto"


def test_inpaint_options_measures_every_setting_on_a_run(smoke_run, tmp_path):
    spec = importlib.util.spec_from_file_location("inpaint_options", REPO / "benchmarks" / "inpaint_options.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "o.txt"
    assert module.main([str(smoke_run), "--images", "4", "--out", str(out)]) == 0
    import json
    row = json.loads(out.read_text())
    families = ["top_half", "left_half", "random50", "patch10"]
    for label in ("default", "rounds=2", "steps=20", "mu(z) only"):
        assert all(0 < row[label][f] < 1 for f in families), label
    # every setting was measured, and refitting z changes the numbers
    assert row["images"] == 4 and row["default"] != row["steps=20"]
