"""Per-channel pixel normalisation, ``(x - mean) / std`` on pixels in [0, 1]: the ``--mean`` and
``--std`` flags, their checks, and where a run takes the values from when they are not given.

A model only works on pixels normalised as in its training, so the values travel with it, in the
args every checkpoint stores. Without the flags a run takes them from the checkpoint it continues
(``--resume``) or starts from (``--finetune``), else ImageNet's (official checkpoints store none and
were trained with those). Explicit flags win; a checkpoint that stores other values gets a warning.
"""

import argparse
import functools
import math
from collections.abc import Sequence

import torch

from util.cli.errors import fail
from util.cli.log import log

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (where the values were found, e.g. 'checkpoint out/checkpoint-9.pth'; that checkpoint's args or None)
Source = tuple[str, argparse.Namespace | None]


def add_norm_args(parser: argparse.ArgumentParser) -> None:
    """``--mean`` and ``--std``; both default to None, which ``resolve`` fills in."""
    g = parser.add_argument_group("normalisation")
    g.add_argument(
        "--mean",
        type=float,
        nargs="+",
        metavar="M",
        help="per-channel mean of the pixels scaled to [0, 1], one value per image channel (default: the values "
        "stored in the checkpoint the run continues or starts from, else ImageNet's 0.485 0.456 0.406); "
        "dataset_stats.py computes them for your data",
    )
    g.add_argument(
        "--std",
        type=float,
        nargs="+",
        metavar="S",
        help="per-channel standard deviation, as --mean (default: the checkpoint's, else ImageNet's 0.229 0.224 0.225)",
    )


def check_norm(mean: Sequence[float], std: Sequence[float], channels: int | None, source: str = "") -> None:
    """One value per channel (``channels`` None: not counted), finite, and std positive (the pixels
    are divided by it). ``source`` names the checkpoint the values came from; without it they are
    the user's flags."""
    for flag, values in (("--mean", mean), ("--std", std)):
        shown = " ".join(f"{v:g}" for v in values)
        bad_count = channels is not None and len(values) != channels
        bad_value = not all(math.isfinite(v) for v in values)
        if source and (bad_count or bad_value):
            fail(
                f"{source} stores {flag} {shown}: {len(values)} value(s) for images of {channels} channels, each "
                f"finite; give --mean and --std"
            )
        if bad_count:
            fail(f"{flag} takes one value per image channel ({channels}), got {len(values)} ({shown})")
        if bad_value:
            fail(f"{flag} values must be finite numbers, got {shown}")
    if not all(v > 0 for v in std):
        prefix = f"{source} stores --std {' '.join(map(str, std))}: " if source else ""
        fail(f"{prefix}--std values must be positive (the pixels are divided by them), got {' '.join(map(str, std))}")
    if not finite_in_float32(mean, std):
        values = f"--mean {show_values(mean)} --std {show_values(std)}"
        fail(
            f"{f'{source} stores ' if source else ''}{values}: pixels in [0, 1] normalised with them leave float32's "
            f"range, in which images are normalised; give values of the pixels' scale (dataset_stats.py computes them)"
        )


def finite_in_float32(mean: Sequence[float], std: Sequence[float]) -> bool:
    """Whether pixels in [0, 1] normalised with ``mean`` and ``std`` stay finite in float32, as the transforms
    (torchvision's Normalize) and ``normalize_on_device`` (on 0..255, the values times 255) compute them.
    Finite values may not: a std that rounds to 0 there (1e-50) is a ValueError of torchvision in the data
    loader, a mean past float32's range (1e300) or a tiny std (1e-40) turns every pixel into inf or NaN."""
    mean32, std32 = (torch.tensor(list(values), dtype=torch.float32) for values in (mean, std))
    for scale in (1.0, 255.0):  # the transforms' pixels, the device loaders'
        pixels = torch.tensor([0.0, scale]).view(2, 1)
        normalised = (pixels - mean32 * scale) / (std32 * scale)
        if not (bool((std32 * scale > 0).all()) and bool(torch.isfinite(normalised).all())):
            return False
    return True


def stored(saved: argparse.Namespace | None) -> tuple[list[float], list[float]] | None:
    """The mean and std a checkpoint's args hold, or None (official releases, older checkpoints)."""
    mean, std = getattr(saved, "mean", None), getattr(saved, "std", None)
    if mean is None or std is None:
        return None
    return [float(v) for v in mean], [float(v) for v in std]


def resolve(args: argparse.Namespace, sources: Sequence[Source], channels_source: str = "") -> None:
    """Set ``args.mean`` and ``args.std`` (float lists, as checkpoints store them): the flags, else the
    first of ``sources`` that stores some, else ImageNet's; says which, and warns about every source
    that stores others. Both flags or neither (``_check_pair``). ``channels_source``: the checkpoint that
    gave --in_chans where it was not given, which an error then names, not a flag the user never gave."""
    channels = int(getattr(args, "in_chans", None) or 3)  # --in_chans where an entry point has it
    _check_pair(args)
    found = [(name, values) for name, saved in sources if (values := stored(saved)) is not None]
    if args.mean is not None:
        mean, std, origin = [float(v) for v in args.mean], [float(v) for v in args.std], "--mean/--std"
        check_norm(mean, std, channels)
    elif found:
        name, (mean, std) = found[0]
        origin = name
        check_norm(mean, std, channels, source=name)
    else:
        mean, std, origin = list(IMAGENET_MEAN), list(IMAGENET_STD), "ImageNet's, the default"
        if channels != 3:
            _fail_without_values(channels, channels_source)
    args.mean, args.std = mean, std
    log.info(f"normalisation: mean {show_values(mean)} std {show_values(std)} ({origin})")
    for name, (m, s) in found:
        if (m, s) != (mean, std):
            # Without the flags a run takes the first stored values: dropping them gives this checkpoint's only
            # where they are those, and fit this run's channels (an RGB checkpoint fine-tuned with --in_chans 1
            # stores three: without the flags the run is refused).
            fits = origin == "--mean/--std" and (m, s) == found[0][1] and len(m) == channels
            advice = "; drop --mean/--std to use the checkpoint's" if fits else ""
            log.warning(
                f"{name} was trained on pixels normalised with mean {show_values(m)} std {show_values(s)}, this run "
                f"uses mean {show_values(mean)} std {show_values(std)} ({origin}){advice}"
            )


def check_flags(args: argparse.Namespace, channels: int | None, from_checkpoint: bool) -> None:
    """What ``resolve`` would refuse of the flags as given, said before a run opens anything (and by
    the SLURM launcher, before the job waits in the queue): both flags or neither, finite values,
    std positive, and one value per channel where the flags alone settle the channel count.
    ``channels``: that count (None where a checkpoint decides it); ``from_checkpoint``: a checkpoint
    the run opens may store the values, so that giving none is no error."""
    _check_pair(args)
    if args.mean is not None:
        check_norm([float(v) for v in args.mean], [float(v) for v in args.std], channels)
    elif channels not in (None, 3) and not from_checkpoint:
        _fail_without_values(channels)


def _check_pair(args: argparse.Namespace) -> None:
    """Both flags or neither: half a normalisation from each of two places is no one's."""
    if (args.mean is None) != (args.std is None):
        fail(f"--mean and --std go together: give both ({'--mean' if args.mean is None else '--std'} is missing)")


def _fail_without_values(channels: int, source: str = "") -> None:
    """``source``: the checkpoint --in_chans came from where the user did not give it."""
    given = f", from {source}," if source else ""
    fail(
        f"--in_chans {channels}{given} needs --mean and --std with {channels} value(s) each, your data's "
        f"per-channel statistics (ImageNet's defaults are RGB's three; dataset_stats.py computes them)"
    )


def show_values(values: Sequence[float]) -> str:
    """As --mean and --std take them: six significant digits, space-separated."""
    return " ".join(f"{v:.6g}" for v in values)


def normalize_on_device(imgs: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [N, C, H, W] batches (the fast and device loaders leave the conversion to the training
    device) -> ``(x / 255 - mean) / std`` in float; float input is returned as it is."""
    if imgs.dtype != torch.uint8:
        return imgs
    mean_t, std_t = _constants(tuple(mean), tuple(std), imgs.device)
    return (imgs.float() - mean_t) / std_t


@functools.lru_cache(maxsize=16)
def _constants(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per device: a host-to-device copy at every step would synchronise the GPU."""
    return tuple(torch.tensor(values, device=device).view(1, -1, 1, 1) * 255 for values in (mean, std))
