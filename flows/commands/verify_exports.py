"""Check that every exported model of a sweep reloads in this fresh process and reproduces the test logits it
was evaluated with (and the parameter count the table reports).

    skeleton verify mlruns/<parent run id>/artifacts/results.parquet [--tolerance 1e-5]

Exits 1 if any model differs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("results", help="a sweep's results.parquet (MLflow parent run artifact)")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    args = parser.parse_args(argv)
    if not Path(args.results).is_file():
        raise SystemExit(f"{args.results}: no such file (a sweep's results.parquet)")

    import pandas as pd
    from safetensors.torch import load_file

    from skeleton.folder import SkeletonFolder
    from skeleton.stages import load_data
    from skeleton.train import predict

    failed = 0
    for row in pd.read_parquet(args.results).dropna(subset=["logits"]).itertuples():
        model, _, _ = SkeletonFolder(row.path).load()
        dsd, info = load_data(row.data)
        diff = (predict(model, dsd["test"], info["pad_id"]) - load_file(row.logits)["logits"]).abs().max().item()
        ok = diff <= args.tolerance and model.num_parameters() == row.parameters
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {row.method:22} p={row.rate:<5} max |logit diff| {diff:.2e}  "
              f"parameters {model.num_parameters():,} (table {int(row.parameters):,})  {row.path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
