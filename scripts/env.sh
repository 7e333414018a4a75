# Sourced by the other scripts: which Python runs kacheryfs here. The project venv (.venv)
# when setup.sh made one (a Python whose packages the OS manages), else $PYTHON or python3.
if [ -x .venv/bin/python ]; then
  PY="$PWD/.venv/bin/python"
  export PATH="$PWD/.venv/bin:$PATH"
else
  PY=${PYTHON:-python3}
fi
