import importlib.util
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_MODEL = os.path.join(ROOT, "models", "toy")
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub


def load_stage(filename):
    """Import a numbered stage script (its name starts with a digit) as a module."""
    spec = importlib.util.spec_from_file_location(filename[:-3].lstrip("0123456789_"), os.path.join(ROOT, filename))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_stage(*args, check=True):
    """Run a stage script as a user would; returns the CompletedProcess."""
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}")
    return result


def run_torchrun(nproc, *args):
    """Run a stage under torchrun with nproc processes (gloo on CPU), on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return run_stage("-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port), *args)


def error_line(result):
    """The stage's own one-line error: the last line of stderr."""
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def toy_model():
    if not os.path.exists(os.path.join(TOY_MODEL, "model_index.json")):
        pytest.fail("models/toy is missing: it is committed; run `python toyworld.py train` to rebuild it")
    return TOY_MODEL
