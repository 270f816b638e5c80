"""Memory, sized before it is allocated: a run that cannot fit stops in one line that names the
flags to change, instead of being killed by the kernel (or CUDA) minutes later. A model's weights
(:func:`model_bytes`, on the meta device too) and a training step's peak (:func:`training_bytes`)
are known before the first step."""

import argparse
import contextlib
import math
import os
from collections.abc import Sequence

import torch
from torch import nn

from util.cli.errors import fail
from util.sizes import image_size, shown_size
from util.train.launch_env import env_count

# Bytes of an activation element in the dtype the matrix products run in.
_ACTIVATION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Optimizer state per trainable parameter, in parameters (AdamW: two moments; SGD and LARS: momentum).
_OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "lars": 1, "sgd": 1}
# Measured peaks (resident memory over two AdamW steps, tiny and small MAEs and ViTs, fp32 and
# bf16) exceed the tensors autograd holds by up to 10%: the allocator's free but unreturned blocks.
_ALLOCATOR_SLACK = 1.15


def available_bytes(device: str | torch.device = "cpu") -> int:
    """Memory a new allocation can take now: free GPU memory on CUDA, else the kernel's
    MemAvailable (what can be allocated without swapping), else total physical memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def require(nbytes: float, what: str, advice: str, device: str | torch.device = "cpu") -> None:
    """Fail in one line unless ``nbytes`` fit in the memory of ``device`` now; ``what`` names the
    allocation (``"the (1, 3137, 192) position embedding of --input_size 224"``), ``advice`` the flags to change."""
    free = available_bytes(device)
    if nbytes > free:
        where = "GPU" if torch.device(device).type == "cuda" else "CPU"
        fail(f"{what} needs about {_gib(nbytes)}, {where} memory has {_gib(free)} free; {advice}")


# Where loader workers hand their batches to the main process (torch's shared-memory files, on Linux).
SHARED_MEMORY = "/dev/shm"


def require_shared_memory(batch_bytes: int, num_workers: int, advice: str, folder: str = SHARED_MEMORY) -> None:
    """Fail in one line unless ``folder`` (/dev/shm) has room for the batches ``num_workers`` loader workers
    prepare ahead (``prefetch_factor`` 2 each), for every process of this node (torchrun's ``LOCAL_WORLD_SIZE``).
    A smaller one (a container's default of 64 MB) ended the run in a worker's bus error, or hung it for good:
    a worker whose batch found no room there dropped it, and the main process waited for it (seen with 200 KiB
    and 2 workers: still waiting after 10 minutes, deaf to SIGTERM's stop at the next check point)."""
    if num_workers <= 0:
        return
    try:
        stat = os.statvfs(folder)
    except OSError:  # none (not Linux): torch shares its batches otherwise
        return
    free = stat.f_bavail * stat.f_frsize
    processes = env_count(os.environ, "LOCAL_WORLD_SIZE", default=1, minimum=1)
    need = 2 * num_workers * batch_bytes * processes
    if need > free:
        each = f" each, for {processes} processes of this node" if processes > 1 else ""
        fail(
            f"--num_workers {num_workers}: the loader workers hand their batches over in {folder}, which has "
            f"{_gib(free)} free, and {2 * num_workers} batches of {_gib(batch_bytes)}{each} need about {_gib(need)}; "
            f"{advice}, or make {folder} larger (docker run --shm-size)"
        )


def _gib(nbytes: float) -> str:
    if nbytes < 2**20:
        return f"{nbytes / 2**10:.0f} KiB"
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**27 else f"{nbytes / 2**20:.0f} MiB"


def model_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers; on the meta device too, where they are not allocated."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def training_bytes(
    model: nn.Module,
    batch_size: int,
    input_size: int | Sequence[int],
    precision: str = "fp32",
    grad_checkpointing: bool = False,
    optimizer: str = "adamw",
    mask_ratio: float | None = None,
    device: str | torch.device = "cpu",
) -> int:
    """Peak memory of a training step of ``model`` (an unwrapped MAE or ViT of this project, on any
    device including meta) on ``batch_size`` images of ``input_size`` on ``device``: weights,
    gradients and optimizer state, plus the activations autograd keeps, per image times the batch.

    Frozen parameters get no gradients nor optimizer state, and a stack of blocks frozen like all
    those before it keeps no activations (linear probing). ``mask_ratio``: None counts every patch."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    # Weights, gradients, optimizer state. DDP adds no second copy of the gradients: they are views into its
    # all-reduce buckets (run.wrap_for_training's gradient_as_bucket_view).
    fixed = model_bytes(model) + trainable * (1 + _OPTIMIZER_STATES[optimizer])
    if precision != "fp32":
        fixed += trainable // 2  # autocast keeps a 16-bit copy of every weight it casts until backward
    # Per image: what the backward pass needs of every block, one block's gradients in flight and
    # the tensors around the blocks.
    height, width = image_size(input_size)
    patch_h, patch_w = model.patch_embed.patch_size
    # The image, and for an MAE its patchified target, the prediction and their difference, in fp32.
    per_image = 4 * model.patch_embed.proj.in_channels * height * width * 4
    trained = False
    for blocks, tokens in _block_stacks(model, (height // patch_h) * (width // patch_w), mask_ratio):
        trained = trained or any(p.requires_grad for p in blocks.parameters())
        per_image += 4 * tokens * _width(blocks[0]) * 4  # embedding, position, gather and final-norm tensors
        per_image += _stack_bytes(blocks, tokens, precision, trained, grad_checkpointing, torch.device(device))
    return int(fixed + batch_size * int(per_image * _ALLOCATOR_SLACK))


def _stack_bytes(
    blocks: nn.Module, tokens: int, precision: str, trained: bool, grad_checkpointing: bool, device: torch.device
) -> int:
    """Activations of one stack of blocks at its peak, for one image."""
    one_block = tokens * _saved_bytes_per_token(blocks[0], precision) + _attention_bytes(blocks[0], tokens, precision)
    if not trained:  # no autograd graph: the forward pass holds one block's tensors at a time
        return one_block
    if not grad_checkpointing:  # every block's saved tensors, and one block's gradients in flight
        return (len(blocks) + 1) * one_block
    # Each block's input, and one block recomputed plus its gradients. On the CPU, glibc's heap
    # keeps the holes the recomputed blocks leave between the gradients: there, measured peaks
    # (which vary by 20% from run to run) show checkpointing saving only about 40%.
    inputs = len(blocks) * tokens * _width(blocks[0]) * 4
    recomputed = math.ceil(0.6 * (len(blocks) + 1)) if device.type == "cpu" else 2
    return inputs + max(2, recomputed) * one_block


def _block_stacks(model: nn.Module, patches: int, mask_ratio: float | None) -> list[tuple[nn.Module, int]]:
    """(blocks, tokens each block sees) of each transformer stack, in the order they run."""
    if hasattr(model, "decoder_blocks"):  # MAE: the encoder sees the class token and the kept patches
        kept = int(patches * (1 - (mask_ratio or 0.0)))
        return [(model.blocks, 1 + kept), (model.decoder_blocks, 1 + patches)]
    return [(model.blocks, getattr(model, "num_prefix_tokens", 1) + patches)]


def _width(block: nn.Module) -> int:
    return block.norm1.normalized_shape[0]


def _saved_bytes_per_token(block: nn.Module, precision: str) -> int:
    """What a timm Block saves for its backward pass, per token: the inputs of its two norms in
    fp32 (the residual stream) and, in the dtype autocast computes in, the inputs of its four
    linear layers (normed, attention output reshaped, normed, GELU output), q, k and v, the
    attention output and the GELU input."""
    dim, hidden = _width(block), block.mlp.fc1.out_features
    return 2 * dim * 4 + (7 * dim + 2 * hidden) * _ACTIVATION_BYTES[precision]


def _attention_bytes(block: nn.Module, tokens: int, precision: str) -> int:
    """The attention matrix (scores and softmax) where attention is not fused; fused attention
    (scaled_dot_product_attention) keeps only a log-sum-exp per token and head."""
    heads = block.attn.num_heads
    if getattr(block.attn, "fused_attn", False):
        return heads * tokens * 4
    return 2 * heads * tokens * tokens * _ACTIVATION_BYTES[precision]


def check_training_fits(model: nn.Module, args: argparse.Namespace, device: str | torch.device) -> None:
    """Refuse, in one line that names the flags to change, a training run whose step cannot fit
    the free memory of ``device``. ``model`` is the unwrapped model as it will train, on ``device``,
    the CPU or the meta device; ``args`` the settled flags (precision not 'auto')."""
    device = torch.device(device)
    flags = (args.batch_size, args.input_size, args.precision, args.grad_checkpointing)
    needed = training_bytes(model, *flags, mask_ratio=getattr(args, "mask_ratio", None), device=device)
    first = next(model.parameters(), None)
    if first is not None and first.device.type == device.type:  # its weights already take free memory
        needed -= model_bytes(model)
    size = shown_size(args.input_size)
    what = f"training --batch_size {args.batch_size} at --input_size {size} in --precision {args.precision}"
    require(needed, what, _fit_advice(args, device), device)


def _fit_advice(args: argparse.Namespace, device: torch.device) -> str:
    options = ["a smaller --input_size"]
    if not args.grad_checkpointing:
        options.append("--grad_checkpointing")
    if args.precision == "fp32":
        options.append("--precision bf16" if device.type == "cpu" else "--precision bf16 or fp16")
    listed = ", ".join(options[:-1]) + " or " + options[-1] if len(options) > 1 else options[0]
    return f"lower --batch_size (raising --accum_iter keeps the effective batch), or use {listed}"
