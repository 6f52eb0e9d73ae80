"""Where a kernel's time goes, from Nsight Compute's per-instruction (SASS) export.

Input: the CSV that ``ncu -i REPORT --page source --csv --print-source sass`` writes (the
``ncu_gemm`` stage of scripts/gpu_run_all.sh with NCU_SOURCE=1 leaves it gzipped in $OUT). It
holds one row per SASS instruction with its execution count and warp-stall samples.

Output: the stall reasons over the whole kernel, then the kernel cut into runs of consecutive
instructions that execute equally often (a loop body, a per-tile prologue or epilogue, code
run once per program), each with its share of the samples, its main opcodes and stalls. A
loop body and a per-tile epilogue thus show up as separate lines without reading the SASS.

Run: python scripts/ncu_sass_summary.py ncu_dsv3_up_sass.csv.gz [--top 20] [--kernel 0]
"""
from __future__ import annotations

import argparse
import collections
import csv
import gzip

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def read_kernels(path: str) -> list[tuple[str, list[str], list[list[str]]]]:
  """(kernel name, header, rows) per kernel in the export (several when several were
  profiled)."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    rows = list(csv.reader(f))
  kernels = []
  for i, r in enumerate(rows):
    if r and r[0] == "Kernel Name":
      header = rows[i + 1]
      body = []
      for row in rows[i + 2:]:
        if row and row[0] == "Kernel Name":
          break
        if len(row) == len(header):
          body.append(row)
      kernels.append((r[1], header, body))
  return kernels


def _int(v: str) -> int:
  return int(v) if v not in ("", "-") else 0


def _opcode(source: str) -> str:
  words = source.split()
  op = words[1] if words and words[0].startswith("@") and len(words) > 1 else words[0]
  return op.split(".")[0]


def summarize(name: str, header: list[str], rows: list[list[str]], top: int) -> str:
  ix = {h: i for i, h in enumerate(header)}
  stalls = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
  total = sum(_int(r[ix[SAMPLES]]) for r in rows) or 1
  lines = [f"{name}: {len(rows)} SASS instructions, {total} stall samples, "
           f"{sum(_int(r[ix[EXECUTED]]) for r in rows)} warp instructions executed"]
  by_reason = {s[6:]: sum(_int(r[ix[s]]) for r in rows) for s in stalls}
  lines.append("stalls: " + ", ".join(f"{k} {v / total:.1%}" for k, v in
                                      sorted(by_reason.items(), key=lambda kv: -kv[1])
                                      if v / total >= 0.01))
  runs = []  # [executions, [row indices]]
  for i, r in enumerate(rows):
    e = _int(r[ix[EXECUTED]])
    if runs and runs[-1][0] == e:
      runs[-1][1].append(i)
    else:
      runs.append([e, [i]])
  lines.append("runs of instructions executed equally often (>= 0.5 % of the samples):")
  for e, idx in runs:
    s = sum(_int(rows[i][ix[SAMPLES]]) for i in idx)
    if s / total < 0.005:
      continue
    ops = collections.Counter(_opcode(rows[i][ix["Source"]].strip()) for i in idx)
    why = collections.Counter()
    for i in idx:
      for st in stalls:
        why[st[6:]] += _int(rows[i][ix[st]])
    lines.append(f"  SASS {idx[0]:4d}-{idx[-1]:4d}  executed {e:>10}  {s / total:6.1%}  "
                 f"ops {dict(ops.most_common(5))}  stalls "
                 + ", ".join(f"{k} {v / max(s, 1):.0%}" for k, v in why.most_common(3)))
  lines.append(f"top {top} instructions by samples:")
  for i in sorted(range(len(rows)), key=lambda i: -_int(rows[i][ix[SAMPLES]]))[:top]:
    r = rows[i]
    main = sorted(((_int(r[ix[st]]), st[6:]) for st in stalls), reverse=True)[:2]
    lines.append(f"  {i:4d} {_int(r[ix[SAMPLES]]) / total:6.1%}  x{_int(r[ix[EXECUTED]]):<10} "
                 f"{r[ix['Source']].strip()[:64]:<64} "
                 + ", ".join(f"{k} {v}" for v, k in main if v))
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("csv", help="ncu --page source --csv --print-source sass output (.csv or .gz)")
  p.add_argument("--top", type=int, default=15, help="instructions listed by samples")
  p.add_argument("--kernel", type=int, default=None, help="only the i-th profiled kernel")
  args = p.parse_args(argv)
  kernels = read_kernels(args.csv)
  if not kernels:
    p.error(f"{args.csv}: no 'Kernel Name' rows; is it ncu's --page source --csv export?")
  picked = kernels if args.kernel is None else [kernels[args.kernel]]
  print("\n\n".join(summarize(n, h, r, args.top) for n, h, r in picked))


if __name__ == "__main__":
  main()
