"""The train command as train_low_mem.py runs it, then what this rank is left holding when it returns:

    [accelerate launch ...] train_then_report.py --output_dir=OUT [train options...]
writes OUT/../left_rank{R}.json: the command's exit code and whether a process group is still up.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repo root, for train_low_mem

from train_low_mem import main

if __name__ == "__main__":
    code = main(sys.argv[1:])
    out = Path(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--output_dir=")))
    record = {"code": code, "process_group": torch.distributed.is_initialized()}
    (out.parent / f"left_rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(record))
    sys.exit(code)
