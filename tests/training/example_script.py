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


def write_text_manifest(path: str) -> str:
    """16 text-only samples ("Count to n."): micro-batches without media, for the trainable-encoder overlap tests."""
    import json

    with open(path, "w") as f:
        for i in range(16):
            f.write(json.dumps({"id": f"text_{i}", "conversations": [
                {"from": "human", "value": f"Count to {i % 5 + 2}."},
                {"from": "gpt", "value": " ".join(str(k) for k in range(1, i % 5 + 3))}]}) + "\n")
    return path
