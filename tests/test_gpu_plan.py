"""The gpu reproduction without a GPU (Langley et al., TMLR 2022, reproduced): every variant of `reproduce --scale
gpu` goes through the notebooks with its own parameters (papermill's translator included) at a tiny size on the
CPU; `gpu` and `paper` refuse to start without CUDA; the command's bad arguments, Ctrl-C and relative data roots;
the Makefile's install stamp; and the lent-GPU script's dry run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sosvae_lib import reproduce
from sosvae_lib.config import image_hw
from sosvae_lib.runs import Run
from sosvae_lib.train import train_config

REPO = Path(__file__).resolve().parents[1]
CELL_TIMEOUT = 240


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _usage_error(capsys, argv: list[str]) -> str:
    """The one stderr line of a usage error of `reproduce.main` (exit status 2)."""
    with pytest.raises(SystemExit) as info:
        reproduce.main(argv)
    assert info.value.code == 2
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    return lines[0]


def _cuda_usable() -> bool:
    from sosvae_lib.devices import cuda_problem
    return cuda_problem() is None


# ---------------------------------------------------------------------------------------------------------------
# the Makefile's install stamp (issue 16.16)

def _make(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-n", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_install_stamp_follows_content_not_mtimes(tmp_path):
    """A copied checkout (every mtime new) with an installed .venv installs nothing; a changed pyproject.toml
    installs again; no step upgrades pip from the network."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    fresh = _make(tmp_path, "venv").stdout
    assert "pip install" in fresh and "install --upgrade pip" not in fresh
    stamp = re.search(r"touch (\S+)", fresh).group(1)  # what a finished install leaves
    (tmp_path / stamp).touch()
    time.sleep(0.01)
    for name in ("Makefile", "pyproject.toml"):  # the copy: newer than the stamp, same content
        os.utime(tmp_path / name, (time.time() + 60, time.time() + 60))
    dry = _make(tmp_path, "test").stdout
    assert "pip" not in dry and "-m pytest -q tests" in dry
    with (tmp_path / "pyproject.toml").open("a") as f:
        f.write("\n# a changed dependency list\n")
    assert "pip install" in _make(tmp_path, "test").stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_reproduce_gpu_without_cuda_is_one_line_exit_2(tmp_path):
    """Build 4 through the Makefile, as a user would type it: one line naming torch's CUDA and what was found."""
    if _cuda_usable():
        pytest.skip("this machine has a usable CUDA device: the gpu scale would start")
    if subprocess.run(["make", "-q", "venv"], cwd=REPO, capture_output=True).returncode != 0:
        pytest.skip("the .venv is not installed by this Makefile's recipe (make would install it first)")
    # as typed in a shell: not a sub-make of `make test` (which would print "Entering directory" lines)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES")}
    proc = subprocess.run(["make", "reproduce", "SCALE=gpu", f"ARGS=--out {tmp_path / 'out'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert proc.stdout == ""
    ours = [line for line in _lines(proc.stderr) if not line.startswith("make: ***")]
    assert len(ours) == 1, proc.stderr
    assert re.match(r"error: device: --scale gpu needs a usable CUDA GPU and CUDA is unusable: torch \S+ "
                    r"\((CUDA [\d.]+|a CPU-only build)\) found .+; pass --device cpu", ours[0]), ours[0]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# the command's arguments (issues 16 Build 4, 17.7, 17.8, 17.14)

@pytest.mark.parametrize("scale", ["gpu", "paper"])
def test_gpu_scales_refuse_to_start_without_cuda(scale, tmp_path, capsys, monkeypatch):
    from sosvae_lib import devices

    problem = "CUDA is unusable: torch 2.11.0+cu130 (CUDA 13.0) found a driver too old for it (driver 12.2)"
    monkeypatch.setattr(devices, "cuda_problem", lambda index=None: problem)
    line = _usage_error(capsys, ["--scale", scale, "--out", str(tmp_path / "out")])
    assert line == (f"error: device: --scale {scale} needs a usable CUDA GPU and {problem}; pass --device cpu to "
                    f"run it on the CPU anyway")
    for device in ("auto", None):  # auto is refused too: it would silently train on the CPU for hours
        with pytest.raises(ValueError, match="needs a usable CUDA GPU"):
            reproduce.reproduce(scale, out=tmp_path / "out", device=device)
    assert not (tmp_path / "out").exists()
    # --device cpu passes the gate (and then starts: the first notebook is interrupted here)
    calls = []

    def interrupted(name, output, parameters, cwd, cell_timeout):
        calls.append(parameters)
        raise KeyboardInterrupt

    monkeypatch.setattr(reproduce, "execute_notebook", interrupted)
    first = reproduce.plan(scale)[0].name
    assert reproduce.main(["--scale", scale, "--out", str(tmp_path / "out"), "--device", "cpu", "--only", first,
                           "--celeba-root", str(_celeba_or_skip())]) == 130
    assert calls and calls[0]["config_fields"]["device"] == "cpu"


@pytest.mark.parametrize("device, pattern", [
    ("gpu0", r"^error: device: must be auto, cpu, cuda or cuda:N, got 'gpu0'$"),
    ("cuda:7", r"^error: device: 'cuda:7' was asked for but "),
])
def test_device_that_is_not_there_or_malformed(device, pattern, tmp_path, capsys):
    if device == "cuda:7" and _cuda_usable():
        import torch
        if torch.cuda.device_count() > 7:
            pytest.skip("this machine has a cuda:7")
    line = _usage_error(capsys, ["--scale", "smoke", "--device", device, "--out", str(tmp_path / "out")])
    assert re.search(pattern, line), line
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_one_line_exit_2(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    line = _usage_error(capsys, ["--scale", "smoke", "--out", str(a_file)])
    assert line == f"error: out: {a_file / 'smoke'} lies under {a_file}, which is a file, not a directory"
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "smoke").write_text("x")  # <out>/<scale> itself a file
    line = _usage_error(capsys, ["--scale", "smoke", "--out", str(tmp_path / "res")])
    assert line.startswith(f"error: out: {tmp_path / 'res' / 'smoke'} is a file, not a directory")
    assert a_file.read_text() == "x" and (tmp_path / "res" / "smoke").read_text() == "x"


def _record_notebooks(monkeypatch) -> list[tuple[str, dict, int | None]]:
    """Replace the notebook runs by a record of (notebook, parameters, cell timeout); each run then fails."""
    calls: list[tuple[str, dict, int | None]] = []

    def record(name, output, parameters, cwd, cell_timeout):
        reproduce.check_papermill_parameters(parameters, name)
        calls.append((name, parameters, cell_timeout))
        raise RuntimeError("not run in this test")

    monkeypatch.setattr(reproduce, "execute_notebook", record)
    return calls


@pytest.mark.parametrize("value, expected", [("0", None), ("240", 240), (None, 300)])
def test_cell_timeout_zero_is_no_limit(value, expected, tmp_path, monkeypatch, capsys):
    calls = _record_notebooks(monkeypatch)
    argv = ["--scale", "smoke", "--only", "orl-diagonal", "--out", str(tmp_path)]
    assert reproduce.main(argv + ([] if value is None else ["--cell-timeout", value])) == 1  # the record "fails"
    assert [(name, timeout) for name, _, timeout in calls] == [("01_train", expected)]


@pytest.mark.parametrize("value", ["-5", "-1", "ten"])
def test_cell_timeout_negative_or_not_a_number_is_refused(value, tmp_path, capsys):
    line = _usage_error(capsys, ["--scale", "smoke", "--cell-timeout", value, "--out", str(tmp_path / "out")])
    assert line.startswith("error: ") and ("cell-timeout" in line), line
    if value.startswith("-"):
        assert line == f"error: cell-timeout: must be a whole number of seconds >= 0 (0: no limit), got {value}"
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"^cell_timeout: must be a whole number of seconds >= 0"):
        reproduce.reproduce("smoke", out=tmp_path / "out", cell_timeout=-5)


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(reproduce, "execute_notebook", interrupted)
    assert reproduce.main(["--scale", "smoke", "--only", "orl-diagonal", "--out", str(tmp_path)]) == 130
    assert _lines(capsys.readouterr().err) == [
        "interrupted; rerun the same command to resume (finished runs are reused, the interrupted one resumed from "
        "its last checkpoint)"]


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_stops_the_kernel_and_the_same_command_resumes(tmp_path):
    """A real SIGINT to the whole process group, as a terminal's Ctrl-C sends it, while 01_train runs in its
    kernel: one line, exit 130, no traceback, the kernel gone; the same command then finishes the run."""
    cmd = [sys.executable, "-m", "sosvae_lib.reproduce", "--scale", "smoke", "--only", "orl-lowrank-r1",
           "--out", str(tmp_path), "--device", "cpu"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # as from a terminal's shell: SIGINT at its default disposition (an earlier test of the suite may leave it
    # ignored in this process, and an ignored SIGINT is inherited by the command)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = ""
        while "training (new" not in line:
            line = proc.stdout.readline()
            assert line, "reproduce ended before training"
        kernels: list[str] = []
        deadline = time.monotonic() + 60
        while not kernels and time.monotonic() < deadline:  # the training kernel: a child of reproduce
            kernels = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            time.sleep(0.2)
        # the signal goes when the kernel is training (its run folder has a config): a kernel still starting
        # ignores SIGINT (ipykernel), and under load that took longer than any fixed wait
        started = tmp_path / "smoke" / "runs" / "orl-lowrank-r1" / "config.json"
        while not started.exists() and time.monotonic() < deadline + 120:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert _lines(err)[-1].startswith("interrupted; rerun the same command to resume")
    time.sleep(2)
    assert kernels and not any(Path(f"/proc/{k}").exists() for k in kernels), "the kernel outlived the command"
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:]
    v = reproduce.plan("smoke")[0]
    assert Run(tmp_path / "smoke" / "runs" / v.name).state(v.config()) == "complete"
    assert not list(tmp_path.rglob("*.tmp"))


# ---------------------------------------------------------------------------------------------------------------
# papermill's parameters (issue 16.2) and relative data roots (issue 16.15)

def _celeba_or_skip() -> Path:
    try:
        return Path(reproduce.find_data("celeba", None))
    except (FileNotFoundError, ValueError, OSError) as err:
        pytest.skip(f"no CelebA data here ({str(err).splitlines()[0]})")


def test_papermill_parameters_that_it_would_turn_into_strings_are_refused():
    from papermill.translators import PythonTranslator

    with pytest.raises(TypeError, match=r"^parameters: 01_train parameter 'overrides' holds a tuple \(\(109, 89\)\)"):
        reproduce.check_papermill_parameters({"overrides": {"image_size": (109, 89)}}, "01_train")
    assert 'image_size = "(109, 89)"' in PythonTranslator.codify({"image_size": (109, 89)})  # why
    with pytest.raises(TypeError, match="'root' holds a PosixPath"):
        reproduce.check_papermill_parameters({"root": Path("/data")})
    reproduce.check_papermill_parameters({"a": None, "b": [1, 2.5, "x", True], "c": {"d": {"e": [None]}}})


@pytest.mark.parametrize("scale", reproduce.SCALES)
def test_every_planned_configuration_survives_papermill(scale):
    """What `reproduce` passes 01_train, through papermill's own translator and the notebook's library call, is the
    configuration the plan checked, for every variant of every scale (shrunk or not)."""
    from papermill.translators import PythonTranslator

    for v in reproduce.plan(scale, folder_root="/data/folder"):
        for variant in (v, reproduce.shrink_variant(v)):
            config = variant.config("/data/root").replace(device="cpu")
            params = dict(config_fields=config.to_dict(), out_dir="/r", figures_dir="/f", figure_name="n")
            reproduce.check_papermill_parameters(params, "01_train")
            namespace: dict = {}
            exec(PythonTranslator.codify(params), namespace)  # the cell papermill injects
            assert train_config(namespace["config_fields"]) == config, variant.name


def test_shrunk_plan_keeps_each_variant_s_own_parameters():
    for v in reproduce.plan("gpu"):
        big, tiny = v.config(), reproduce.shrink_variant(v).config()
        assert reproduce.shrink_variant(v).name == v.name
        assert type(tiny.image_size) is type(big.image_size) and max(image_hw(tiny.image_size)) == 16
        assert (tiny.epochs, tiny.pretrain_epochs, tiny.max_items) == (1, int(v.pretrain), 16) and tiny.batch_size <= 8
        for field in ("dataset", "head", "rank", "latent", "data_on_device", "device", "precision", "levels"):
            assert getattr(tiny, field) == getattr(big, field), field
    tiny = {v.group: reproduce.shrink_variant(v).config().image_size for v in reproduce.plan("gpu")}
    assert tiny == {"celeba": 16, "celeba109x89": (16, 13), "orl": 16, "fashion-mnist": 16}


def test_notebook_done_only_for_a_finished_execution_newer_than_its_inputs(tmp_path):
    params = {"lowrank_run": "/r/a", "diagonal_run": None, "figure_name": "x"}
    executed, checkpoint = tmp_path / "02_samples-x.ipynb", tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"w")
    cells = [{"cell_type": "markdown", "metadata": {}}] + [
        {"cell_type": "code", "metadata": {"papermill": {"status": "completed"}}} for _ in range(3)]

    def write(exception=None, parameters=params, status="completed", end_time="2026-01-01T00:00:00"):
        nb = {"cells": [dict(c) for c in cells],
              "metadata": {"papermill": {"exception": exception, "parameters": parameters, "end_time": end_time}}}
        nb["cells"][-1] = {"cell_type": "code", "metadata": {"papermill": {"status": status}}}
        executed.write_text(json.dumps(nb))
        later = checkpoint.stat().st_mtime + 1
        os.utime(executed, (later, later))

    assert not reproduce.notebook_done(executed, params, [checkpoint])  # never executed
    write()
    assert reproduce.notebook_done(executed, params, [checkpoint, tmp_path / "absent.json"])
    assert not reproduce.notebook_done(executed, {**params, "figure_name": "y"}, [checkpoint])
    later = executed.stat().st_mtime + 1
    os.utime(checkpoint, (later, later))  # the run changed after the figure was drawn
    assert not reproduce.notebook_done(executed, params, [checkpoint])
    for broken in (dict(exception=True), dict(status="failed"), dict(end_time=None)):
        write(**broken)
        assert not reproduce.notebook_done(executed, params, []), broken
    executed.write_text('{"cells": [')  # cut short
    assert not reproduce.notebook_done(executed, params, [])


def _gray_folder(root: Path, n: int = 24) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(root / f"img{i:02d}.png")


def test_relative_data_roots_are_passed_absolute(tmp_path, monkeypatch):
    """The kernels run in <out>/<scale>: a relative --folder-root, and a default CelebA folder found relative to the
    working directory (./data/celeba), reach the notebooks as absolute, resolved folders."""
    _gray_folder(tmp_path / "data" / "mri")
    monkeypatch.chdir(tmp_path)
    calls = _record_notebooks(monkeypatch)
    reproduce.main(["--scale", "cpu", "--only", "folder-diagonal", "--folder-root", "data/mri", "--out", "out",
                    "--device", "cpu"])
    assert calls[0][1]["config_fields"]["root"] == str(tmp_path / "data" / "mri")
    shared = _celeba_or_skip()
    monkeypatch.delenv("SOSVAE_CELEBA", raising=False)
    (tmp_path / "data" / "celeba").symlink_to(shared)
    assert reproduce.find_data("celeba", None) == str(shared.resolve())
    assert reproduce.find_data("celeba", "data/celeba") == str(shared.resolve())


# ---------------------------------------------------------------------------------------------------------------
# every variant of the gpu plan through papermill on the CPU (issue 16 Build 3)

@pytest.mark.slow
def test_every_gpu_plan_variant_runs_through_the_notebooks(tmp_path):
    celeba = _celeba_or_skip()
    reason = reproduce.data_available("fashion-mnist", None)
    if reason:
        pytest.skip(f"no Fashion-MNIST here ({reason})")
    t0 = time.perf_counter()
    # every training notebook (each variant's own parameters); the figure notebooks of the 109×89 group only (their
    # parameters are the same kinds for every group: the smoke reproduction covers them too)
    rc = reproduce.main(["--scale", "gpu", "--device", "cpu", "--shrink-for-tests", "--out", str(tmp_path),
                         "--celeba-root", str(celeba), "--cell-timeout", str(CELL_TIMEOUT),
                         "--figure-groups-for-tests", "celeba109x89"])
    seconds = time.perf_counter() - t0
    d = tmp_path / "gpu"
    status = json.loads((d / "reproduce.json").read_text())
    assert (rc, status["failed"], status["skipped"]) == (0, [], [])
    plan = reproduce.plan("gpu")
    assert set(status["runs"]) == {v.name for v in plan} and len(plan) == 16
    assert sorted({v.group for v in plan}) == ["celeba", "celeba109x89", "fashion-mnist", "orl"]
    executed = sorted(p.name for p in (d / "notebooks").glob("*.ipynb"))
    assert executed == sorted([f"01_train-{v.name}.ipynb" for v in plan] + ["05_metrics.ipynb"]
                              + [f"{nb}-celeba109x89.ipynb"
                                 for nb in ("02_samples", "03_editing", "04_components", "06_editor")])
    for v in plan:  # each run was trained with the variant's own parameters, types included
        stored = json.loads((d / "runs" / v.name / "config.json").read_text())
        want = reproduce.shrink_variant(v).config(stored["root"], d / "runs").replace(device="cpu").to_dict()
        assert stored == want, v.name
        assert stored["data_on_device"] is True and stored["latent"] == 128 and Path(stored["root"]).is_absolute()
        n = json.loads((d / "figures" / f"{v.name}_training.json").read_text())
        assert n["complete"] is True and n["epochs"] == 1 and n["rank"] == (0 if v.head == "diagonal" else v.rank)
        assert (d / "runs" / v.name / "eval_test.json").is_file() is not v.pretrain  # a pre-training is not scored
    assert json.loads((d / "runs" / "celeba109x89-lowrank-r25" / "config.json").read_text())["image_size"] == [16, 13]
    # the executed training notebook received the whole configuration, the (H, W) size as a list
    nb = json.loads((d / "notebooks" / "01_train-celeba109x89-lowrank-r25.ipynb").read_text())
    injected = next(c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", []))
    assert '"image_size": [16, 13]' in "".join(injected["source"])
    for g in ("celeba109x89",):
        for stem in ("samples", "editing", "columns", "principal", "interpolation", "editor"):
            assert (d / "figures" / f"{g}_{stem}.png").stat().st_size > 1000, (g, stem)
    rows = json.loads((d / "tables" / "metrics.json").read_text())
    assert {(r["dataset"], r["head"]) for r in rows} >= {("celeba", "lowrank"), ("orl", "diagonal")}
    print(f"gpu plan, shrunk, through papermill: {seconds:.0f} s")


# ---------------------------------------------------------------------------------------------------------------
# the lent-GPU script (issue 16 Build 6)

def test_gpu_check_dry_run_lists_every_step_and_runs_nothing(tmp_path):
    script = REPO / "scripts" / "gpu_check.sh"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", str(script), "--dry-run", "--carry", str(tmp_path / "carry"), "--results",
                           str(tmp_path / "res"), "--", "--only", "orl"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    commands = [line[2:] for line in out.splitlines() if line.startswith("+ ")]
    assert any(c.endswith("--no-build-isolation --disable-pip-version-check -e .") and "--no-index" in c
               for c in commands), commands
    assert any("-m pytest -q -m cuda tests" in c and c.startswith("timeout ") for c in commands), commands
    assert any("benchmarks/bench_train.py --device cuda" in c for c in commands), commands
    repro = [c for c in commands if "sosvae_lib.reproduce" in c]
    assert len(repro) == 1 and repro[0].startswith("timeout -s INT -k 60 ")
    assert int(repro[0].split()[4]) <= 540 and repro[0].endswith(f"--scale gpu --out {tmp_path / 'res'} --only orl")
    assert any(c.startswith("split -b 15M") for c in commands)
    assert "missing here: " in out
    assert not (tmp_path / "out").exists() and not (tmp_path / "res").exists()  # nothing was run or written


@pytest.mark.parametrize("argv, message", [
    (["--chunk", "600"], "error: chunk: at most 540 seconds"),
    (["--budget", "-3"], "error: budget: must be a whole number of seconds > 0, got '-3'"),
    (["--steps", "install,train"], "error: steps: unknown step 'train'"),
    (["--wheels"], "error: unknown option '--wheels'"),
])
def test_gpu_check_bad_options_are_one_line_exit_2(argv, message, tmp_path):
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), *argv], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path / "out")}, timeout=60)
    assert proc.returncode == 2 and _lines(proc.stderr) == [proc.stderr.strip()]
    assert proc.stderr.startswith(message), proc.stderr
    assert not (tmp_path / "out").exists()


def _load_gpu_carry():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_carry", REPO / "scripts" / "gpu_carry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wheel(folder: Path, name: str, requires: list[str]) -> Path:
    import zipfile

    path = folder / f"{name}-1.0-py3-none-any.whl"
    meta = "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n{meta}")
    return path


def test_gpu_carry_keeps_the_dependency_closure_minus_what_the_machine_has(tmp_path):
    carry = _load_gpu_carry()
    wheels = {carry.wheel_name(w): w for w in (
        _wheel(tmp_path, "papermill", ["nbclient>=0.2", "requests", "colorama; sys_platform == 'win32'",
                                       "black; extra == 'black'"]),
        _wheel(tmp_path, "nbclient", ["jupyter_client", "traitlets (>=5)"]),
        _wheel(tmp_path, "jupyter_client", ["traitlets", "tomli; python_version < '3.11'"]),
        _wheel(tmp_path, "traitlets", []),
        _wheel(tmp_path, "requests", ["urllib3"]))}
    keep = carry.closure(wheels, ["papermill"], {"requests"}, "3.12")
    assert keep == ["jupyter-client", "nbclient", "papermill", "traitlets"]  # no requests, colorama, black, tomli
    with pytest.raises(SystemExit, match="no wheel was downloaded for tomli"):
        carry.closure(wheels, ["papermill"], {"requests"}, "3.10")


def test_gpu_carry_copies_as_many_celeba_images_as_fit(tmp_path):
    carry = _load_gpu_carry()
    src = tmp_path / "celeba"
    (src / "img_align_celeba").mkdir(parents=True)
    names = [f"{i:06d}.jpg" for i in range(1, 11)]
    for n in names:
        (src / "img_align_celeba" / n).write_bytes(b"x" * 1000)
    for table, value in (("identity_CelebA.txt", 7), ("list_eval_partition.txt", 0)):
        (src / table).write_text("".join(f"{n} {value}\n" for n in names + ["999999.jpg"]))
    count, size = carry.copy_celeba(src, tmp_path / "out", room=4200, images=None)
    copied = sorted(p.name for p in (tmp_path / "out" / "img_align_celeba").iterdir())
    assert count == 4 and copied == names[:4] and size <= 4200
    assert (tmp_path / "out" / "identity_CelebA.txt").read_text() == "".join(f"{n} 7\n" for n in names[:4])
    assert carry.copy_celeba(src, tmp_path / "out", room=0, images=6)[0] == 6
