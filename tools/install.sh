#!/usr/bin/env bash
# Set up (or complete) a Python environment for ECLIPSE-D2. Safe to run again and again.
#
#   tools/install.sh [PYTHON]      PYTHON defaults to "python3"; give .venv/bin/python for a venv
#
# Steps, each skipped when already satisfied:
#   1. PyTorch + torchvision, only if `import torch` fails (torch==2.14.1, torchvision==0.29.1).
#   2. Detectron2, only if no detectron2 package is installed at all: the pure-Python wheel
#      sal-detectron2==0.7.2 (a build of Detectron2 main; its compiled _C is not needed).
#      An installed detectron2 (e.g. the user's own official build) is never touched.
#   3. requirements.txt (Detectron2's own dependencies, this project's, pytest).
#   4. This project, editable, without dependencies.
# Then it prints the versions and checks that everything imports.
set -euo pipefail

say() { printf '[install] %s\n' "$*"; }
die() { printf '[install] ERROR: %s\n' "$*" >&2; exit 1; }

PY="${1:-python3}"
# a path like .venv/bin/python must keep working after the `cd`s below
case "$PY" in
    */*) [ -x "$PY" ] || die "Python interpreter '$PY' not found."
         PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;;
esac
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

TORCH_PIN="torch==2.14.1"
TORCHVISION_PIN="torchvision==0.29.1"
D2_WHEEL="sal-detectron2==0.7.2"
D2_WHEEL_PYTHON="3.10"  # the wheel is tagged cp310; its Python code runs on newer CPythons

# `python -c` puts the current directory on sys.path; run probes from a neutral folder so a
# stray ./detectron2 or ./torch folder cannot fool them.
probe() { (cd / && "$PY" -c "$1") >/dev/null 2>&1; }
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

command -v "$PY" >/dev/null 2>&1 || die "Python interpreter '$PY' not found."
"$PY" -m pip --version >/dev/null 2>&1 \
    || die "'$PY -m pip' does not work; install pip for this interpreter (python -m ensurepip)."
say "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

# 1. PyTorch -------------------------------------------------------------------------------
if probe "import torch"; then
    say "torch already installed: $(cd / && "$PY" -c 'import torch; print(torch.__version__)') (kept)"
    if ! probe "import torchvision"; then
        TV="$(cd / && "$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
        if [ "$TV" = "${TORCH_PIN#torch==}" ]; then
            say "installing $TORCHVISION_PIN to match torch $TV"
            pip_install "$TORCH_PIN" "$TORCHVISION_PIN" \
                || die "could not install $TORCHVISION_PIN."
        else
            die "torchvision is missing. Install the torchvision release that matches your torch $TV (see https://pytorch.org), then run this script again."
        fi
    fi
else
    say "installing $TORCH_PIN $TORCHVISION_PIN"
    pip_install "$TORCH_PIN" "$TORCHVISION_PIN" \
        || die "could not install $TORCH_PIN $TORCHVISION_PIN. Install PyTorch for your platform (https://pytorch.org), then run this script again."
fi

# 2. Detectron2 ----------------------------------------------------------------------------
if probe "import importlib.util as u, sys; sys.exit(u.find_spec('detectron2') is None)"; then
    D2_PATH="$(cd / && "$PY" -c 'import importlib.util as u; print(u.find_spec("detectron2").origin)')"
    if probe "import detectron2"; then
        say "detectron2 already installed at ${D2_PATH%/__init__.py} (kept)"
    else
        # Present but not importable yet: usually a missing dependency, which step 3 installs.
        # Never overwrite it; the final check reports it if it still does not import.
        say "detectron2 found at ${D2_PATH%/__init__.py} but it does not import yet; leaving it as it is"
    fi
else
    SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    [ -w "$SITE" ] || die "no detectron2 installed, and $SITE is not writable. Use a virtual environment (make venv), or install Detectron2 yourself (https://detectron2.readthedocs.io)."
    say "installing Detectron2 ($D2_WHEEL, pure Python) into $SITE"
    pip_install --no-deps --only-binary=:all: --python-version "$D2_WHEEL_PYTHON" \
        --target "$SITE" "$D2_WHEEL" \
        || die "could not install $D2_WHEEL. Install Detectron2 yourself (https://detectron2.readthedocs.io), then run this script again."
fi

# 3. Run-time requirements -------------------------------------------------------------------
say "installing requirements.txt"
pip_install -r requirements.txt || die "pip install -r requirements.txt failed (see above)."

# 4. This project ----------------------------------------------------------------------------
say "installing eclipse-d2 (editable, no dependencies)"
pip_install --no-deps -e . || die "pip install -e . failed (see above)."

# Report and verify --------------------------------------------------------------------------
(cd / && "$PY" - <<'PYCHECK'
import importlib
import sys
import warnings

warnings.filterwarnings("ignore", message=".torch.jit.script. is deprecated", category=FutureWarning)

failed = []
for name in ["torch", "torchvision", "detectron2", "numpy", "panopticapi", "mask2former", "continual"]:
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # report every failure, not only the first
        failed.append(name)
        print(f"[install]   {name:12s} FAILED: {type(exc).__name__}: {exc}")
    else:
        print(f"[install]   {name:12s} {getattr(mod, '__version__', '')} ({mod.__file__})")
if failed:
    print("[install] ERROR: cannot import: " + ", ".join(failed), file=sys.stderr)
    sys.exit(1)
print("[install] OK: detectron2, torch, panopticapi, mask2former and continual import")
PYCHECK
) || die "the environment is incomplete (see the import errors above)."
