"""Collect the GPU study's rows from what the device commands brought back into results.json.

    python recipes/cifar10_gpu/results.py --back DIR [DIR ...] --dest recipes/cifar10_gpu/results

Each DIR holds one command's files ($OUT of pretrain.sh, labels10.sh, labels100.sh or choose.sh:
times.jsonl, log files, frozen.json). Rows are those of the CPU study's results.json (``row``,
``encoder``, ``seed``, ``top1``, ``seconds``, ``command``) plus ``gpu_seconds`` (the run's wall
time divided by the runs that shared the GPU with it), ``img_s`` (images trained, each epoch's
last incomplete batch left out, or encoded for the frozen rows, per second of the run's wall time,
start-up included) and ``gpu`` (the GPU's name, from times.jsonl: an H100's and an H200's seconds
compare only among themselves). Only measured
runs become rows; a run that failed or was stopped at its time limit is left out and named.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from plan import PEAK_TFLOPS, pretrain_flops  # noqa: E402

from util.atomic import atomic_write  # noqa: E402

# Images trained per epoch: training drops an epoch's last incomplete batch, so 48 batches of 1024 of the
# 50,000 images in pre-training (pretrain.sh's --batch_size), and finetune.sh's batches of 512 or 256.
TRAIN_IMAGES = {
    "labels100-test": 50_000 // 512 * 512,
    "heldout": 45_000 // 512 * 512,
    "labels10-test": 5_000 // 256 * 256,
    "labels10-val": 5_000 // 256 * 256,
}
PRETRAIN_IMAGES = 50_000 // 1024 * 1024
RECIPE = "bash recipes/cifar10_gpu"


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def timings(back: Path) -> dict[str, dict]:
    """The runs of one command by name; a run timed twice (a rerun) counts with its last time."""
    return {t["run"]: t for t in json_lines(back / "times.jsonl")}


def share(time: dict) -> dict:
    return {"seconds": time["seconds"], "gpu_seconds": round(time["seconds"] / time["sharing"], 1)}


def pretrain_row(back: Path, model: str) -> dict | None:
    log, time = json_lines(back / "pretrain-log.txt"), timings(back).get("pretrain")
    if not log or time is None or time["status"] != 0:
        return None
    epochs = log[-1]["epoch"] + 1
    img_s = PRETRAIN_IMAGES * epochs / time["seconds"]
    scored = [x for x in log if "knn_cls_top1" in x]
    return {
        "row": "pre-training",
        "encoder": "MAE",
        "seed": 0,
        "top1": None,  # no classifier; its k-NN score on heldout/ is knn_heldout_top1
        "knn_heldout_top1": scored[-1]["knn_cls_top1"] if scored else None,
        "loss": log[-1]["train_loss"],
        "epochs": epochs,
        **share(time),
        "img_s": round(img_s),
        # Against plan.py's 790 TFLOP/s, the bf16 rate both lent kinds measured (no matmul is timed in this run);
        # start-up and the k-NN monitor are counted too.
        "mfu": round(img_s * pretrain_flops(model) / (PEAK_TFLOPS * 1e12), 4),
        "command": f"{RECIPE}/pretrain.sh",
    }


def frozen_rows(back: Path, pretrained: bool) -> tuple[list[dict], list[str]]:
    """The k-NN and linear rows of frozen.json; the MAE encoder's only when its pre-training (in
    the same folder) finished: a run stopped at its limit left a checkpoint of an unfinished schedule."""
    rows, left_out = [], []
    entries = json_lines(back / "frozen.json")
    frozen = timings(back).get("frozen")
    if frozen is not None and frozen["status"] != 0:  # frozen.json holds the encoders scored before it stopped
        scored = ", ".join(entry["encoder"] for entry in entries) or "none"
        left_out.append(f"frozen rows of the encoders not scored (status {frozen['status']}; scored: {scored})")
    for entry in entries:
        encoder = "MAE" if entry["encoder"].endswith(".pth") else entry["encoder"]
        if encoder == "MAE" and not pretrained:
            left_out.append(f"frozen rows of {entry['encoder']} (its pre-training did not finish)")
            continue
        for name, value in entry.items():
            if name.endswith("_top1"):
                protocol = "linear (cached features)" if "_linear" in name else "k-NN"
                rows.append(
                    {
                        "row": f"{protocol}, {name.split('_')[0]}",
                        "encoder": encoder,
                        "seed": 0,
                        "top1": value,
                        "seconds": entry["seconds"],
                        "gpu_seconds": entry["seconds"],
                        "img_s": round((entry["bank"] + entry["queries"]) / max(entry["seconds"], 0.1)),
                        "command": entry["command"],
                    }
                )
    return rows, left_out


def finetune_rows(back: Path) -> tuple[list[dict], list[str]]:
    rows, left_out = [], []
    times = timings(back)
    for log in sorted(back.glob("finetune-*-log.txt")):
        name = log.name.removesuffix("-log.txt")  # finetune-<init>-<split>-s<seed>
        init, rest = name.split("-", 2)[1:]
        split, seed = rest.rsplit("-s", 1)
        lines, time = json_lines(log), times.get(name)
        scored = [x for x in lines if "test_acc1" in x]
        if time is None or time["status"] != 0 or not scored:
            left_out.append(name)
            continue
        epochs = lines[-1]["epoch"] + 1
        rows.append(
            {
                "row": f"fine-tune, {split}",
                "encoder": "MAE" if init == "mae" else "scratch",
                "seed": int(seed),
                "top1": scored[-1]["test_acc1"],  # the last epoch's, never the best
                "epochs": epochs,
                **share(time),
                "img_s": round(TRAIN_IMAGES[split] * epochs / time["seconds"]),
                "command": f"{RECIPE}/finetune.sh {init} {seed} {split}",
            }
        )
    return rows, left_out


def collect(backs: list[Path], model: str = "mae_vit_tiny_patch2") -> tuple[list[dict], list[str]]:
    """Every measured row of the commands' folders, and the runs left out."""
    rows, left_out = [], []
    for back in backs:
        pretrain = pretrain_row(back, model)
        found = [pretrain] if pretrain else []
        for more, missing in (frozen_rows(back, pretrain is not None), finetune_rows(back)):
            found, left_out = found + more, left_out + missing
        # The GPU that ran the command (common.sh's GPU_NAME): an H100's seconds and an H200's do not compare.
        gpu = next((t["gpu"] for t in json_lines(back / "times.jsonl") if "gpu" in t), None)
        rows += [{**row, "gpu": gpu} for row in found]
    return rows, left_out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--back", nargs="+", required=True, type=Path, help="folders of the commands' files")
    parser.add_argument("--dest", required=True, type=Path, help="where results.json goes")
    parser.add_argument("--model", default="mae_vit_tiny_patch2", help="the pre-trained MAE (for its FLOPs)")
    args = parser.parse_args()
    rows, left_out = collect(args.back, args.model)
    for row in rows:
        print(f"{row['row']:36} {row['encoder']:8} seed {row['seed']}  top-1 {row['top1']}  {row['gpu_seconds']} GPU-s")
    if left_out:
        print(f"left out (failed, stopped or unscored): {', '.join(left_out)}")
    args.dest.mkdir(parents=True, exist_ok=True)
    atomic_write(str(args.dest / "results.json"), lambda f: f.write((json.dumps(rows, indent=1) + "\n").encode()))
    print(f"wrote {args.dest / 'results.json'} ({len(rows)} rows)")
