"""What the diagnostic benchmarks share: their JSON result file (no JAX or CUDA needed)."""
from __future__ import annotations

import datetime
import json
import os


def write_json(out_dir: str, prefix: str, **payload) -> str:
  """``payload`` plus ``date`` (UTC) as ``<out_dir>/<prefix>_<date>.json``; returns the path."""
  os.makedirs(out_dir, exist_ok=True)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
  path = os.path.join(out_dir, f"{prefix}_{stamp}.json")
  with open(path, "w") as f:
    json.dump(dict(payload, date=stamp), f, indent=1)
  print(f"wrote {path}")
  return path
