"""The encoder of a pre-training checkpoint as bf16 safetensors, small enough to come back from the
GPU machine (at most 16 MiB a file) and to travel to the next one: ViT-Tiny's 5.4 M encoder weights
are 10.8 MB in bf16 (21.6 MB in fp32). ``main_finetune.py --finetune`` reads it (as fp32 weights,
rounded to bf16) and takes the model, image size and mean/std from its metadata.

    python recipes/cifar10_gpu/export_encoder.py CHECKPOINT OUTPUT.safetensors
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from util.checkpoint.load import load_checkpoint, model_state  # noqa: E402
from util.cli.errors import fail, run_cli  # noqa: E402
from util.interop.files import write_weights  # noqa: E402
from util.interop.timm import encoder_state  # noqa: E402


def export_bf16_encoder(checkpoint: str, output: str) -> int:
    """Write the encoder in bf16 with the run's args; returns the file's size in bytes."""
    if not output.endswith(".safetensors"):
        fail(f"output {output}: name it .safetensors")
    ckpt = load_checkpoint(checkpoint)
    encoder = encoder_state(model_state(ckpt, checkpoint), checkpoint)
    write_weights(output, {k: v.to(torch.bfloat16) for k, v in encoder.items()}, ckpt.get("args"))
    size = os.path.getsize(output)
    print(f"wrote {len(encoder)} encoder tensors in bf16 to {output} ({size / 2**20:.1f} MiB)")
    return size


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a main_pretrain.py checkpoint")
    parser.add_argument("output", help="the .safetensors file to write")
    args = parser.parse_args()
    run_cli(lambda: export_bf16_encoder(args.checkpoint, args.output))
