"""Weighted k-nearest-neighbour classification of frozen features: the representation monitor of
self-supervised learning (Wu et al. 2018, "instance discrimination"; the DINO protocol).

Each query image takes the vote of its ``k`` most cosine-similar bank images (L2-normalised
features of the frozen encoder), each weighted by ``exp(similarity / t)``. No training, no
augmentation: the score follows the encoder alone and costs one forward pass per image. Under DDP
every rank embeds its own shard and the features are gathered in the data set's order, so the
result equals the one-process result.
"""

import argparse
import copy
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets

from util.cli.args import check_at_least
from util.cli.errors import fail
from util.cli.log import log
from util.data.channels import image_loader
from util.data.datasets import classification_splits
from util.data.loaders import batches, eval_transform, require_batch_memory
from util.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from util.data.sampling import ShardSampler, evenly_spaced, loader_generator, require_a_share_each
from util.eval.linear import linear_accuracy
from util.memory import require
from util.sizes import image_size
from util.train import distributed, interrupt
from util.train.precision import autocast

# Encoder outputs [N, 1 + L, D] (class token first, after the final norm) -> named features [N, D].
Features = dict[str, torch.Tensor]


def pooled_features(tokens: torch.Tensor) -> Features:
    """The two usual read-outs of a ViT: the class token and the mean of the patch tokens."""
    return {"cls": tokens[:, 0], "avg": tokens[:, 1:].mean(dim=1)}


def pixel_features(images: torch.Tensor) -> Features:
    """The raw-pixel baseline: the normalised image itself, flattened."""
    return {"pixels": images.flatten(1)}


@torch.inference_mode()
def embed(
    features_fn: Callable[[torch.Tensor], Features],
    loader: DataLoader,
    total: int,
    device: torch.device,
    precision: str = "fp32",
    source: str = "the encoder",
) -> Features:
    """L2-normalised features of every image of ``loader`` (this rank's shard of ``total``), gathered
    from all ranks in the data set's order. Features that are not finite are an error naming ``source``:
    they would score as a plausible number (every similarity NaN, the vote to ``topk``'s first class)."""
    parts: dict[str, list[torch.Tensor]] = {}
    for images, _ in batches(loader):
        images = images.to(device, non_blocking=True)
        with autocast(precision, str(device)):
            feats = features_fn(images)
        for name, f in feats.items():
            parts.setdefault(name, []).append(F.normalize(f.float(), dim=1))
    features = {name: _gather_in_order(torch.cat(p), total) for name, p in parts.items()}
    # Checked on the gathered features, which every rank holds alike: all ranks stop together.
    for name, f in features.items():
        if bad := int((~f.isfinite().all(dim=1)).sum()):
            fail(
                f"{source} gives features that are not finite (NaN or inf) for {bad} of the {total} images "
                f"({name}); its weights are not finite, or --precision overflows: use another checkpoint "
                f"or --precision fp32"
            )
    return features


def _gather_in_order(local: torch.Tensor, total: int) -> torch.Tensor:
    """Rank r holds items r, r + w, r + 2w, ... (``ShardSampler``); put them back in order."""
    world = distributed.world_size()
    if world == 1:
        return local
    rows = -(-total // world)  # shards differ by at most one item: pad to equal sizes
    padded = local.new_zeros(rows, local.shape[1])
    padded[: len(local)] = local
    shards = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(shards, padded)
    # Row j of rank r is item j * world + r: interleave the shards row by row.
    return torch.stack(shards, dim=1).reshape(rows * world, local.shape[1])[:total]


def knn_scores(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 20,
    t: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores [Q, num_classes] of each query: the sum of ``exp(cos / t)`` over its ``k``
    nearest bank items of that class, divided by ``exp(top cos / t)`` of its nearest item (the same for
    every class of a query, so the ranking is the vote's). Features must be L2-normalised."""
    k = min(k, len(bank))
    scores = []
    for start in range(0, len(queries), chunk):  # a [chunk, bank] similarity matrix at a time
        similarity = queries[start : start + chunk] @ bank.T
        top_sim, top_idx = similarity.topk(k, dim=1)
        # Relative to the nearest item: exp(cos / t) itself overflows float32 where cos / t passes 88.7 (a close
        # neighbour at --knn_t below 0.011), and the classes with an inf vote tied, argmax taking the first.
        weights = ((top_sim - top_sim[:, :1]) / t).exp()
        votes = torch.zeros(len(top_idx), num_classes, device=queries.device, dtype=weights.dtype)
        scores.append(votes.scatter_add_(1, bank_labels[top_idx], weights))
    return torch.cat(scores)


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 accuracy (%), and top-5 where there are more than 5 classes."""
    result = {"top1": 100.0 * (scores.argmax(dim=1) == labels).float().mean().item()}
    if scores.shape[1] > 5:
        top5 = scores.topk(5, dim=1).indices.eq(labels.unsqueeze(1)).any(dim=1)
        result["top5"] = 100.0 * top5.float().mean().item()
    return result


# Labelled data
class KnnData:
    """The labelled bank (``<path>/train``) and queries (``<path>/val`` or ``test``), center-cropped to
    ``input_size`` (one side or (height, width)) and normalised with the encoder's ``mean``/``std``;
    ``bank_size``/``query_size`` take evenly spaced subsets (0: all)."""

    def __init__(
        self,
        path: str,
        input_size: int | Sequence[int],
        bank_size: int = 0,
        query_size: int = 0,
        flag: str = "--data_path",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        in_chans: int = 3,
    ):
        transform = eval_transform(input_size, mean, std, in_chans)
        # The channels are the scored model's, which another --in_chans would not fit: an image of others is told to
        # change (it was told to give --in_chans, which would have pre-trained a gray run on its data read as RGB).
        loader = image_loader(in_chans, fixed_by=f"the model that {flag} scores")
        bank, queries = classification_splits(path, transform, transform, nb_classes=None, flag=flag, loader=loader)
        if len(bank.classes) < 2:
            fail(f"{flag} {path}/train has {len(bank.classes)} class folder(s); k-NN needs at least 2")
        self.path, self.flag, self.size, self.in_chans = path, flag, image_size(input_size), in_chans
        self.classes = bank.classes
        self.bank, self.bank_labels = _subset(bank, bank_size)
        self.queries, self.query_labels = _subset(queries, query_size)
        self._check_shares()  # at start: the k-NN monitor of pre-training scores only after epochs of it

    def _check_shares(self) -> None:
        """Every rank gets bank and query images (``require_a_share_each`` says why). Made in the process group
        (its entry points make it after joining), so checked once, here."""
        for images, what, flag in ((self.bank, "bank", "--knn_bank_size"), (self.queries, "query", "--knn_query_size")):
            subject = f"{self.flag} {self.path}: {len(images)} k-NN {what} image(s)"
            require_a_share_each(len(images), subject, f"run fewer, or give more {what} images ({flag} 0: all)")

    def loaders(self, batch_size: int, num_workers: int) -> tuple[DataLoader, DataLoader]:
        """This rank's shard of the bank and of the queries (every image once over all ranks)."""
        require_batch_memory(self.size, self.in_chans, batch_size, num_workers)
        options = dict(batch_size=batch_size, num_workers=num_workers, worker_init_fn=interrupt.ignore_in_worker)
        return tuple(
            DataLoader(d, sampler=ShardSampler(len(d)), generator=loader_generator(), **options)
            for d in (self.bank, self.queries)
        )

    def __repr__(self) -> str:
        return f"{len(self.bank)} bank and {len(self.queries)} query images, {len(self.classes)} classes"


def _subset(dataset: datasets.ImageFolder, size: int) -> tuple[Dataset, torch.Tensor]:
    """Evenly spaced items: class-balanced for an ImageFolder (sorted by class) of equal classes."""
    labels = torch.tensor(dataset.targets)
    if size <= 0 or size >= len(dataset):
        return dataset, labels
    indices = evenly_spaced(size, len(dataset))
    return _only(dataset, indices), labels[indices]


def _only(dataset: datasets.ImageFolder, indices: list[int]) -> datasets.ImageFolder:
    """A copy of ``dataset`` that holds the samples at ``indices`` alone. A ``Subset`` would keep
    every sample of the folder: in each rank's memory for the whole pre-training (ImageNet's 1.28M
    for a bank of 10,000) and in what each loader worker receives at every scoring."""
    kept = copy.copy(dataset)
    kept.samples = [dataset.samples[i] for i in indices]
    kept.targets = [dataset.targets[i] for i in indices]
    if hasattr(dataset, "imgs"):  # ImageFolder's other name for its samples
        kept.imgs = kept.samples
    return kept


# The evaluation
def evaluate(
    features_fn: Callable[[torch.Tensor], Features],
    data: KnnData,
    args: argparse.Namespace,
    linear_epochs: int = 0,
    source: str = "the encoder",
) -> dict[str, float]:
    """k-NN top-1 (and top-5) of every feature ``features_fn`` returns, e.g. ``cls_top1``; with
    ``linear_epochs``, also ``cls_linear_top1``, a linear classifier on the cached bank features
    (util/eval/linear.py). ``source`` names the encoder in errors. Reads ``args.knn_k``, ``knn_t``,
    ``batch_size``, ``num_workers``, ``device``, ``precision``."""
    device = torch.device(args.device)
    require_score_memory(data, device)
    bank_loader, query_loader = data.loaders(args.batch_size, args.num_workers)
    bank = embed(features_fn, bank_loader, len(data.bank), device, args.precision, source)
    queries = embed(features_fn, query_loader, len(data.queries), device, args.precision, source)
    results = {}
    bank_labels, query_labels = data.bank_labels.to(device), data.query_labels.to(device)
    for name in bank:
        scores = knn_scores(bank[name], bank_labels, queries[name], len(data.classes), args.knn_k, args.knn_t)
        results |= {f"{name}_{metric}": value for metric, value in accuracy(scores, query_labels).items()}
        if linear_epochs:
            results[f"{name}_linear_top1"] = linear_accuracy(
                bank[name], bank_labels, queries[name], query_labels, len(data.classes), epochs=linear_epochs
            )
    return results


def require_score_memory(data: KnnData, device: torch.device) -> None:
    """The class scores of every query and one chunk's votes (``knn_scores``), sized before any
    image is embedded: their width is the class count, which a list file's largest label sets."""
    classes, queries = len(data.classes), len(data.queries)
    require(
        4 * classes * (queries + min(queries, 1024)),
        f"the k-NN class scores of {queries} query image(s) x {classes} classes",
        f"a list's labels are class indices, the largest sets the class count: number the classes of "
        f"{data.flag} {data.path} 0, 1, 2, ... without gaps",
        device,
    )


def k_used(k: int, data: KnnData) -> int:
    """The k the vote takes (``knn_scores``): ``k``, at most the bank's size, with a warning where that lowers it."""
    if k > len(data.bank):
        log.warning(f"--knn_k {k} is more than the {len(data.bank)} bank images: k = {len(data.bank)}")
    return min(k, len(data.bank))


def settle_k(args: argparse.Namespace, data: KnnData) -> None:
    """``args.knn_k`` becomes the k used (``k_used``)."""
    args.knn_k = k_used(args.knn_k, data)


def add_knn_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """``--knn_k``, ``--knn_t``, ``--knn_bank_size``, ``--knn_query_size``; returns the group."""
    g = parser.add_argument_group("k-NN evaluation")
    g.add_argument("--knn_k", default=20, type=int, help="neighbours that vote")
    g.add_argument("--knn_t", default=0.07, type=float, help="temperature of the vote weights")
    g.add_argument("--knn_bank_size", default=0, type=int, metavar="N", help="N evenly spaced train images (0: all)")
    g.add_argument("--knn_query_size", default=0, type=int, metavar="N", help="N evenly spaced val images (0: all)")
    return g


def check_knn_args(args: argparse.Namespace) -> None:
    check_at_least(args, 1, "knn_k")
    if not 0 < args.knn_t < float("inf"):
        fail(f"--knn_t must be positive, got {args.knn_t}")
    check_at_least(args, 0, "knn_bank_size", "knn_query_size", zero_means="all")
