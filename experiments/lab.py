"""What the experiments share: the repository root on sys.path (so that `import common` works from
here), the stage scripts as modules (their file names start with a digit), and two small helpers."""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import atomic_write, write_text  # noqa: E402,F401 (the experiments' shared writers)


def load_stage(filename):
    """A numbered stage script, e.g. "02_train_expert.py", imported as a module (its main() not run)."""
    spec = importlib.util.spec_from_file_location(filename[:-3].lstrip("0123456789_"), os.path.join(ROOT, filename))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def slug(category):
    """A category's folder name, as stage 2 names it: 'Illegal Activity' -> 'illegal-activity'."""
    return category.lower().replace(" ", "-")
