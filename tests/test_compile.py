"""What ``--compile`` compiles over whole runs: each training step's shape once, evaluation's two batch shapes once
each, all of them static, and nothing after the first epoch; a graph per shape and phase, far below dynamo's
recompile limit, past which the rest of a run would go eagerly and quietly lose the speed.

The graphs are counted by a backend that records what dynamo hands it and runs it eagerly: which graphs are made,
their shapes and which serves each call are dynamo's decisions (its guards, recompiles and graph breaks), the same
whatever backend compiles them; inductor took 80 to 105 s on the 2-core CPU for what each run compiles."""

import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from helpers import TINY, make_dataset, make_split, preserved_signals, torch_threads  # noqa: E402

import main_finetune  # noqa: E402
import main_linprobe  # noqa: E402
import main_pretrain  # noqa: E402

IMAGE = (3, 32, 32)  # an image of these runs: the graph input whose first dimension is the batch


@dataclass
class Graph:
    """One graph dynamo compiled: the batch size it was made for (None: a dynamic batch dimension) and how
    many calls of each batch size it served."""

    batch: int | None
    calls: Counter = field(default_factory=Counter)


def _batch(tensors: Any) -> int | torch.SymInt | None:
    images = [t for t in tensors if isinstance(t, torch.Tensor) and tuple(t.shape[1:]) == IMAGE]
    return images[0].shape[0] if images else None


@pytest.fixture
def compiled(monkeypatch) -> Iterator[list[Graph]]:
    """The graphs that ``torch.compile`` (as ``--compile`` calls it) makes in the test, in order."""
    import torch._dynamo

    graphs: list[Graph] = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        batch = _batch(example_inputs)
        graph = Graph(batch if isinstance(batch, int) else None)
        graphs.append(graph)

        def run(*args: Any) -> Any:
            graph.calls[_batch(args)] += 1
            return gm.forward(*args)

        return run

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, **{**kw, "backend": counting}))
    torch._dynamo.reset()  # no graphs, guards or sizes an earlier test left
    torch._dynamo.utils.counters.clear()
    try:
        with preserved_signals(), torch_threads(1):
            yield graphs
    finally:
        torch._dynamo.reset()


def _graph_breaks() -> dict[str, int]:
    return dict(torch._dynamo.utils.counters["graph_break"])


def test_pretraining_compiles_its_step_once_per_process_and_not_for_knn_or_pictures(compiled, tmp_path):
    """3 epochs of 2 steps (33 images in batches of 16: the short last one is dropped), with the k-NN monitor
    and the reconstruction picture after every epoch (both call the plain model, in eval mode), then a resume
    from inside epoch 1 (a new process in real life: dynamo's caches are reset): one static graph each, which
    serves every step; no graph break."""
    data, knn = make_dataset(tmp_path / "data", 11), make_split(tmp_path / "knn", train=4, val=2)
    argv = [*TINY, "--model", "mae_vit_mini_patch4", "--data_path", str(data), "--output_dir", str(tmp_path / "out")]
    argv += ["--log_dir", "", "--epochs", "3", "--warmup_epochs", "1", "--ckpt_every_steps", "1", "--keep_last", "0"]
    argv += ["--knn_data_path", str(knn), "--knn_freq", "1", "--vis_freq", "1", "--compile"]
    main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))
    assert [(g.batch, dict(g.calls)) for g in compiled] == [(16, {16: 6})]

    torch._dynamo.reset()
    compiled.clear()
    resume = ["--resume", str(tmp_path / "out" / "checkpoint-1-step1.pth")]
    main_pretrain.main(main_pretrain.get_args_parser().parse_args([*argv, *resume]))
    assert [(g.batch, dict(g.calls)) for g in compiled] == [(16, {16: 3})]  # epoch 1's second step, epoch 2's two
    assert _graph_breaks() == {}


def test_finetuning_compiles_train_and_both_evaluation_batches_static_once(compiled, tmp_path):
    """3 epochs of fine-tuning (mixup and cutmix on), each evaluated on 27 images: batches of 16 and 11.
    Three static graphs, all made in the first epoch: the training step's, and evaluation's full and short
    batch's (eval mode and no_grad are guards of their own). Dynamo's automatic dynamic shapes compiled the
    short batch with a dynamic batch dimension, and that graph then served the full batches of the later
    evaluations too."""
    data = make_split(tmp_path / "data", train=11, val=9)  # 33 training images: 2 steps of 16
    argv = ["--data_path", str(data), "--nb_classes", "3", "--model", "vit_mini_patch4", "--input_size", "32"]
    argv += ["--batch_size", "16", "--output_dir", str(tmp_path / "out"), "--log_dir", "", "--epochs", "3"]
    argv += ["--warmup_epochs", "1", "--device", "cpu", "--precision", "fp32", "--num_workers", "0"]
    argv += ["--mixup", "0.8", "--cutmix", "1.0", "--compile"]
    main_finetune.main(main_finetune.get_args_parser().parse_args(argv))
    assert [(g.batch, dict(g.calls)) for g in compiled] == [(16, {16: 6}), (16, {16: 3}), (11, {11: 3})]
    assert _graph_breaks() == {}
    assert len(compiled) < torch._dynamo.config.recompile_limit


def test_linear_probing_compiles_train_and_both_evaluation_batches_static_once(compiled, tmp_path):
    """The probe (a frozen encoder, a BatchNorm head in train mode while training and in eval mode after) makes the
    same three static graphs as fine-tuning, all in the first epoch, as docs/pretraining.md says."""
    data = make_split(tmp_path / "data", train=11, val=9)  # 33 training images: 2 steps of 16; 27 to evaluate
    argv = ["--data_path", str(data), "--nb_classes", "3", "--model", "vit_mini_patch4", "--input_size", "32"]
    argv += ["--batch_size", "16", "--output_dir", str(tmp_path / "out"), "--log_dir", "", "--epochs", "2"]
    argv += ["--warmup_epochs", "1", "--device", "cpu", "--precision", "fp32", "--num_workers", "0", "--compile"]
    main_linprobe.main(main_linprobe.get_args_parser().parse_args(argv))
    assert [(g.batch, dict(g.calls)) for g in compiled] == [(16, {16: 4}), (16, {16: 2}), (11, {11: 2})]
    assert _graph_breaks() == {}
