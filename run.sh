#!/usr/bin/env bash
# One entry point for a fresh machine with only Python >= 3.11:
#   ./run.sh demo [ciml demo options]   set up .venv, then run the ShapeComposition demo into demo_out/
#   ./run.sh test [pytest options]      set up .venv, then run ruff, the layer contracts and the test suite
#                                       (CIML_TEST_WORKERS processes, default 2; 0: in this process)
#   ./run.sh setup                      only set up .venv
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${CIML_VENV:-.venv}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  local stamp="$VENV/.ciml-installed"
  local want
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # torch 2.13.0 is pinned in pyproject.toml: pip takes the CPU build from local disk where one lies.
    "$VENV/bin/python" -m pip install --quiet -e ".[dev]"
    echo "$want" > "$stamp"
  fi
}

command=${1:-help}
shift || true
case "$command" in
  setup) setup ;;
  demo)
    setup
    exec "$VENV/bin/ciml" demo --out demo_out "$@"
    ;;
  test)
    setup
    "$VENV/bin/ruff" check src tests benchmarks
    "$VENV/bin/lint-imports"
    # Tests use one torch thread each: two worker processes keep two cores busy. Tests of one file
    # share a worker, so module fixtures (trained runs) are built once.
    exec "$VENV/bin/python" -m pytest -q -n "${CIML_TEST_WORKERS:-2}" --dist loadfile "$@"
    ;;
  *)
    echo "usage: ./run.sh {demo|test|setup} [options]" >&2
    exit 2
    ;;
esac
