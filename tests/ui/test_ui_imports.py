"""The page imports without the training package: it only starts `lorakit train` processes and
reads their run folders (file names from lorakit.runfolder), so a broken or heavy Trainer import
never keeps the page from opening."""

import subprocess
import sys

SCRIPT = """
import sys
sys.modules["transformers.trainer"] = None  # importing either now raises ImportError
sys.modules["lorakit.train"] = None
import lorakit.ui.app
from lorakit.ui.tabs import chat, compare, evaluate, models, train
loaded = sorted(name for name, module in sys.modules.items()
                if module is not None and (name.startswith("lorakit.train") or name == "transformers.trainer"))
print("loaded:", loaded)
sys.exit(1 if loaded else 0)
"""


def test_the_page_imports_without_the_trainer():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "loaded: []" in r.stdout
