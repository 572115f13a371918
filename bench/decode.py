#!/usr/bin/env python3
"""GPT-2 decode benchmark against transformers, ONNX Runtime and llama.cpp (same as `quill bench decode`).

    python bench/decode.py            # GPT-2 124M (random weights), full run, results in docs/benchmarks/
    python bench/decode.py --quick    # a short run
    python bench/decode.py --model PATH --systems quill,llama

See quill/bench.py for what is measured and how.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runners import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
