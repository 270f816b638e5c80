# Sourced by the device commands (benchmarks/gpu_check.sh, recipes/cifar10_gpu/common.sh). The GPU
# machine comes with its own torch and timm; wheels carried in wheels/ (git-ignored; made by
# benchmarks/fetch_wheels.sh) are installed for the run over them, into a folder put first on
# PYTHONPATH, so that the run uses the releases the suite was tested with. Without wheels/, nothing
# changes. Needs PYTHON; run from the repository's root.
#
#   use_wheels SITE   # SITE: a scratch folder for the installed packages

use_wheels() {
    local site=$1 wheels=${WHEELS:-wheels}
    compgen -G "$wheels/*.whl" >/dev/null || return 0
    [[ :${PYTHONPATH:-}: == *:"$site":* ]] && return 0 # a nested script of the same run
    rm -rf "$site" # pip --target keeps what an earlier run installed there
    # A device run is too dear to lose to this: without the wheels it goes on with the machine's own.
    PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install -q --no-index --no-deps --target "$site" "$wheels"/*.whl ||
        { echo "warning: could not install $wheels/*.whl; going on with the machine's packages" >&2; return 0; }
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    echo "using $(cd "$wheels" && echo *.whl) over the machine's packages" >&2
}
