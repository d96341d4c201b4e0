# The tested stacks (README: Tested matrix), sourced by setup.sh and test.sh. R1MEGA_STACK picks one:
#   current (default)  .venv        python3 (3.11 here), torch 2.13.0 (the CPU wheel on this disk),
#                                   the megatron-core pip picks for that Python (0.16.1 on 3.11); whole suite
#   newest             .venv-py312  Python 3.12, torch 2.14.1 (the newest pip installs here: the PyPI
#                                   CUDA build, which runs on the CPU), the newest megatron-core the pin in
#                                   pyproject.toml admits (0.19.x); the tests listed in tests/newest-stack.txt
# PYTHON and TORCH_VERSION override a stack's interpreter and torch.
STACK=${R1MEGA_STACK:-current}

# The newest Python 3.12 here: python3.12 on PATH if it runs, else pyenv's newest 3.12.x.
python312() {
    local c
    for c in python3.12 $(ls -d "$(pyenv root 2>/dev/null || echo ~/.pyenv)"/versions/3.12.*/bin/python3.12 2>/dev/null | sort -V -r); do
        if "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
            echo "$c"
            return
        fi
    done
    echo "stack newest needs Python 3.12 (python3.12 on PATH, or pyenv install 3.12)" >&2
    return 1
}

# "Python 3.12.1, torch 2.14.1, megatron-core 0.19.2": what the stack's virtual environment holds.
stack_versions() {
    "$VENV/bin/python" - <<'PY'
import platform
from importlib.metadata import version
print(f"Python {platform.python_version()}, torch {version('torch')}, megatron-core {version('megatron-core')}")
PY
}

case "$STACK" in
    current)
        VENV=.venv
        TORCH=${TORCH_VERSION:-2.13.0}
        ;;
    newest)
        VENV=.venv-py312
        TORCH=${TORCH_VERSION:-2.14.1}
        ;;
    *)
        echo "R1MEGA_STACK must be current or newest, not '$STACK'" >&2
        exit 2
        ;;
esac
