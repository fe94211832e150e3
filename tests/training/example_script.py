"""Load examples/pretrain_longvila.py as a module (it is a script, not part of the package)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "pretrain_longvila.py")


def load_example_script():
    spec = importlib.util.spec_from_file_location("pretrain_longvila_example", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
