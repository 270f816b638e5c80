"""Collect the CPU study's rows into results.json and a markdown table, and copy each run's small
text logs next to it (for committing; checkpoints stay where they are).

    python recipes/cifar10_cpu/results.py --out out/cifar10_cpu --dest recipes/cifar10_cpu/results
"""

import argparse
import json
import re
import shutil
import statistics
from pathlib import Path


def _json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def collect(out: Path) -> list[dict]:
    """One dict per measured row: what, encoder, seed, metric, value, wall time and command."""
    walls = {w["row"]: w["seconds"] for w in _json_lines(out / "wall_times.jsonl")}
    rows = []
    for entry in _json_lines(out / "frozen.json"):
        epoch = re.search(r"checkpoint-(\d+)\.pth$", entry["encoder"])
        encoder = f"MAE, epoch {epoch.group(1)}" if epoch else entry["encoder"]
        for name, value in entry.items():
            if name.endswith("_top1"):
                protocol = "linear (cached features)" if "_linear" in name else "k-NN"
                feature = name.split("_")[0]
                rows.append(
                    {
                        "row": f"{protocol}, {feature}",
                        "encoder": encoder,
                        "seed": 0,
                        "top1": value,
                        "seconds": entry["seconds"],
                        "command": entry["command"],
                    }
                )
    for log in sorted(out.glob("finetune-*/log.txt")):
        name = log.parent.name  # finetune-<init>-<split>-s<seed>
        init, split, seed = name.split("-")[1], "-".join(name.split("-")[2:-1]), int(name.split("-s")[-1])
        lines = _json_lines(log)
        evaluated = [x for x in lines if "test_acc1" in x]
        if not evaluated:
            continue
        rows.append(
            {
                "row": f"fine-tune, {split}",
                "encoder": "MAE" if init == "mae" else "scratch",
                "seed": seed,
                "top1": evaluated[-1]["test_acc1"],  # the last epoch's, never the best
                "epochs": lines[-1]["epoch"] + 1,
                "seconds": walls.get(f"finetune-{init}-s{seed}"),
                "command": f"bash recipes/cifar10_cpu/finetune.sh {init} {seed} {split}",
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one line per (row, encoder), seeds as 'mean (a, b)'."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["row"], r["encoder"]), []).append(r)
    lines = ["| measure | encoder | top-1 (%) | seeds |", "| --- | --- | --- | --- |"]
    for (row, encoder), runs in groups.items():
        values = [r["top1"] for r in runs]
        shown = f"{statistics.mean(values):.1f}" + (
            f" ({', '.join(f'{v:.1f}' for v in values)})" if len(values) > 1 else ""
        )
        lines.append(f"| {row} | {encoder} | {shown} | {len(values)} |")
    return "\n".join(lines)


def copy_logs(out: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("frozen.json", "knn_curve.json", "wall_times.jsonl"):
        if (out / name).exists():
            shutil.copyfile(out / name, dest / name)
    for log in out.glob("*/log.txt"):
        shutil.copyfile(log, dest / f"{log.parent.name}-log.txt")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="the study's output folder (OUT of common.sh)")
    parser.add_argument("--dest", default=None, type=Path, help="copy logs and write results.json here")
    return parser


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    rows = collect(args.out)
    print(table(rows))
    if args.dest is not None:
        copy_logs(args.out, args.dest)
        (args.dest / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {args.dest / 'results.json'} ({len(rows)} rows)")
