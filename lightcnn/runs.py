"""Tabulate finished runs: the configuration values that differ between them, and their final metrics.

    python -m lightcnn.runs runs/                        # Markdown table of every run below runs/
    python -m lightcnn.runs runs/sweep --csv results.csv # also as CSV
    python -m lightcnn.runs runs/sweep --sort test/acc1  # best first

A run is a folder holding the `config.yaml` a fit saved. It is finished when its test has written
`test_metrics.json` (`ClassifierModule` writes it after every test); unfinished runs are listed only with
`--all`. Final metrics are the test metrics, plus the last value of each `val/` column of the run's
`metrics.csv` when there is one.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from lightcnn.training.research import flatten

IGNORED = ("run_root", "name", "ckpt_path")  # differ between runs by construction


def _last_values(metrics_csv: Path, prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key and key.startswith(prefix) and value not in ("", None):
                    out[key] = float(value)
    return out


def collect(root: str | Path, include_unfinished: bool = False) -> list[dict[str, Any]]:
    """One dict per run below `root`: `run` (its folder), `config` (flat), `metrics`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no folder {root}")
    runs = []
    for config_file in sorted(root.rglob("config.yaml")):
        folder = config_file.parent
        metrics: dict[str, float] = {}
        if (folder / "test_metrics.json").is_file():
            metrics.update(json.loads((folder / "test_metrics.json").read_text()))
        elif not include_unfinished:
            continue
        if (folder / "metrics.csv").is_file():
            metrics.update({k: v for k, v in _last_values(folder / "metrics.csv", "val/").items()})
        config = flatten(yaml.safe_load(config_file.read_text()) or {})
        runs.append({"run": str(folder.relative_to(root)) if folder != root else ".", "config": config,
                     "metrics": metrics})
    return runs


def table(runs: list[dict[str, Any]], sort: str | None = None) -> tuple[list[str], list[list[Any]]]:
    """(header, rows): the run, each config key whose value differs between the runs, each metric."""
    keys = sorted({k for r in runs for k in r["config"]})
    differing = [k for k in keys if not k.startswith(IGNORED)
                 and len({json.dumps(r["config"].get(k), sort_keys=True, default=str) for r in runs}) > 1]
    metrics = sorted({k for r in runs for k in r["metrics"]}, key=lambda k: (not k.startswith("test/"), k))
    if sort:
        runs = sorted(runs, key=lambda r: -r["metrics"].get(sort, float("-inf")))
    rows = [[r["run"], *(r["config"].get(k) for k in differing),
             *(round(r["metrics"][m], 4) if m in r["metrics"] else None for m in metrics)] for r in runs]
    return ["run", *(_short(k) for k in differing), *metrics], rows


def _short(key: str) -> str:
    return key.replace("/init_args/", "/")


def markdown(header: list[str], rows: list[list[Any]]) -> str:
    cell = lambda v: "" if v is None else str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def to_csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(["" if v is None else v for v in row] for row in rows)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m lightcnn.runs", description=__doc__.split("\n")[0])
    parser.add_argument("root", help="folder of run folders (e.g. runs/ or runs/NAME)")
    parser.add_argument("--csv", help="also write the table as CSV to this file")
    parser.add_argument("--sort", help="sort by this metric, highest first (e.g. test/acc1)")
    parser.add_argument("--all", action="store_true", help="include runs that have not finished their test")
    args = parser.parse_args(argv)
    try:
        runs = collect(args.root, args.all)
    except FileNotFoundError as e:
        print(f"lightcnn.runs: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    if not runs:
        print(f"lightcnn.runs: error: no finished run (config.yaml with test_metrics.json) below {args.root}",
              file=sys.stderr)
        raise SystemExit(2)
    header, rows = table(runs, args.sort)
    text = markdown(header, rows)
    print(text)
    if args.csv:
        Path(args.csv).write_text(to_csv(header, rows))
    return text


if __name__ == "__main__":
    main()
