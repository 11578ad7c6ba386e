import contextlib
import importlib.util
import io
import os
import socket
import subprocess
import sys
import traceback

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_MODEL = os.path.join(ROOT, "models", "toy")
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub

# The work fixture's stage 1 and 2 (test_stages.py, test_experiments.py)
TINY_GEN = ["--concepts_per_category", "1", "--pairs_per_concept", "4", "--sampling_steps", "8", "--filter", "none"]
TINY_TRAIN = ["--max_train_steps", "3", "--train_batch_size", "4", "--learning_rate", "1e-2"]
STAGES = {}  # the stage scripts loaded in this process (run_in_process)


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


def run_in_process(script, *args):
    """(exit status, stdout, stderr) of main() of a stage, as the interpreter would report them; in this
    process, which saves importing torch and diffusers again (seconds a case)."""
    if script not in STAGES:
        STAGES[script] = load_stage(script)
    out, err, argv, cwd = io.StringIO(), io.StringIO(), sys.argv, os.getcwd()
    sys.argv = [script, *map(str, args)]
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            STAGES[script].main()
        code = 0
    except SystemExit as end:  # entry_point and argparse end here
        code = end.code if isinstance(end.code, int) else int(end.code is not None)
    except Exception:  # what a user would see as a traceback
        err.write(traceback.format_exc())
        code = 1
    finally:
        sys.argv = argv
        os.chdir(cwd)
        from common import _LOCKS
        while _LOCKS:  # in one process the folders' locks would outlive the "run"
            _LOCKS.pop().close()
    return code, out.getvalue(), err.getvalue()


def refusal(*args):
    """The one error line of a stage run that must be refused. Run in this process (its main(), as
    `python 0N_*.py ...` would), which saves importing torch again; test_bad_inputs runs one as a subprocess,
    test_toyworld its refusals (toyworld.py is not a stage)."""
    code, _, err = run_in_process(*args)
    assert code != 0 and "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


def error_line(result):
    """The stage's own one-line error: the last line of stderr."""
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def toy_model():
    if not os.path.exists(os.path.join(TOY_MODEL, "model_index.json")):
        pytest.fail("models/toy is missing: it is committed; run `python toyworld.py train` to rebuild it")
    return TOY_MODEL


@pytest.fixture(scope="session")
def work(tmp_path_factory, toy_model):
    """Stages 1 and 2 once for the session: pairs and two experts (toy recipe), shared by test_stages and
    test_experiments (whose tests do not depend on the recipe); tests that change them work on a copy."""
    root = tmp_path_factory.mktemp("stages")
    data = str(root / "data")
    run_stage("01_generate_data.py", "--model", toy_model, "--output_dir", data, *TINY_GEN)
    for category in ("Violence", "Hate"):
        run_stage("02_train_expert.py", "--model", toy_model, "--data", data, "--category", category,
                  "--output_dir", str(root / category), *TINY_TRAIN)
    return root
