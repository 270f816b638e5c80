"""Stop a fine-tuning command at once, before its unpack, where the bf16 encoder it would start
from is missing or another model's (a CPU trial's left in encoder/): every MAE run would fail.

    python recipes/cifar10_gpu/check_encoder.py ENCODER.safetensors MAE_MODEL
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from util.checkpoint.load import load_checkpoint  # noqa: E402
from util.cli.errors import fail, run_cli  # noqa: E402


def check_encoder(path: str, model: str) -> None:
    made = getattr(load_checkpoint(path).get("args"), "model", None)
    if made != model:
        fail(f"{path} is an encoder of {made}, not of {model} (MAE_MODEL): carry the one pretrain.sh brought back")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("encoder", help="the .safetensors file export_encoder.py wrote")
    parser.add_argument("model", help="the MAE model the study pre-trains (MAE_MODEL)")
    args = parser.parse_args()
    run_cli(lambda: check_encoder(args.encoder, args.model))
