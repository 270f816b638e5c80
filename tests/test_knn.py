"""k-NN monitor and knn_eval.py: the weighted vote against hand computations, accuracy at its
known extremes (separable features, shuffled labels), one process against two, and errors."""

import argparse
import io
import json
import math
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_same,
    checkpoint_names,
    demo_files,
    isolated_interrupts,
    load,
    load_spec,
    official_layouts,
    one_line_error,
    read_log,
    run_pretrain,
    run_ranks,
    started_ranks,
    torch_threads,
)
from PIL import Image

import knn_eval
import models_mae
from util.checkpoint.encoder import load_mae_encoder
from util.checkpoint.flags import fill_from_checkpoints
from util.checkpoint.opening import SHARED_CHECKPOINT, Opened
from util.cli.errors import UserError
from util.data.sampling import evenly_spaced
from util.eval import knn
from util.eval.linear import linear_accuracy


def labelled_folder(root: Path, per_class: int, val_per_class: int, classes=("airplane", "cat", "ship")) -> Path:
    """<root>/train/<class>/ and <root>/val/<class>/ from the committed CIFAR-10 sample."""
    files = demo_files(per_class + val_per_class, classes)
    for i, src in enumerate(files):
        split = "train" if i % (per_class + val_per_class) < per_class else "val"
        dest = root / split / src.parent.name / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    return root


# ---------------------------------------------------------------------------------------------
# The vote
def test_vote_weights_follow_the_temperature():
    # Query q; bank: two class-0 items at cosine 0.5, one class-1 item at cosine 0.9.
    q = torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([[0.5, math.sqrt(0.75)], [0.5, -math.sqrt(0.75)], [0.9, math.sqrt(0.19)]])
    labels = torch.tensor([0, 0, 1])
    for t in (0.07, 1.0, 10.0):
        scores = knn.knn_scores(bank, labels, q, num_classes=2, k=3, t=t)
        # Relative to the nearest item's weight, exp(0.9 / t).
        expected = torch.tensor([[2 * math.exp(0.5 / t), math.exp(0.9 / t)]]) / math.exp(0.9 / t)
        torch.testing.assert_close(scores, expected, rtol=1e-5, atol=0)
    # A sharp temperature lets the single close neighbour win, a flat one the majority.
    assert knn.knn_scores(bank, labels, q, 2, k=3, t=0.07).argmax().item() == 1
    assert knn.knn_scores(bank, labels, q, 2, k=3, t=10.0).argmax().item() == 0
    # Only the k nearest vote: with k=1 the close item alone scores.
    torch.testing.assert_close(knn.knn_scores(bank, labels, q, 2, k=1, t=1.0), torch.tensor([[0.0, 1.0]]))


def test_a_sharp_temperature_lets_the_nearest_neighbour_win():
    """exp(cos / t) overflowed float32 where cos / t passed 88.7: at --knn_t 0.005 both classes' votes were inf,
    and argmax gave the first class, though the query is nearer the other one."""
    q = torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([[0.7, math.sqrt(0.51)], [0.99, math.sqrt(1 - 0.99**2)]])
    labels = torch.tensor([0, 1])
    for t in (0.005, 1e-4):
        scores = knn.knn_scores(bank, labels, q, num_classes=2, k=2, t=t)
        assert scores.isfinite().all(), t
        assert scores.argmax().item() == 1, t


def test_chunks_do_not_change_the_scores():
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(300, 16, generator=g), dim=1)
    queries = F.normalize(torch.randn(50, 16, generator=g), dim=1)
    labels = torch.randint(0, 7, (300,), generator=g)
    whole = knn.knn_scores(bank, labels, queries, 7, k=10, chunk=1000)
    # Equal up to the matmul's rounding, which depends on the block shape.
    torch.testing.assert_close(knn.knn_scores(bank, labels, queries, 7, k=10, chunk=7), whole, rtol=1e-5, atol=0)


def _clusters(n_per_class: int, classes: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, 32, generator=torch.Generator().manual_seed(99)), dim=1)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    feats = centres[labels] + spread * torch.randn(len(labels), 32, generator=g)
    return F.normalize(feats, dim=1), labels


def test_separable_features_score_100():
    bank, bank_labels = _clusters(50, 10, 0.05, seed=1)
    queries, query_labels = _clusters(20, 10, 0.05, seed=2)
    result = knn.accuracy(knn.knn_scores(bank, bank_labels, queries, 10), query_labels)
    assert result == {"top1": 100.0, "top5": 100.0}


def test_shuffled_labels_score_chance():
    bank, bank_labels = _clusters(200, 10, 0.05, seed=1)
    queries, query_labels = _clusters(100, 10, 0.05, seed=2)
    shuffled = bank_labels[torch.randperm(len(bank_labels), generator=torch.Generator().manual_seed(3))]
    result = knn.accuracy(knn.knn_scores(bank, shuffled, queries, 10), query_labels)
    assert 4.0 < result["top1"] < 16.0  # chance is 10%; 1,000 queries
    assert 35.0 < result["top5"] < 65.0  # chance is 50%


def test_top5_only_above_five_classes():
    bank, labels = _clusters(10, 5, 0.05, seed=1)
    assert set(knn.accuracy(knn.knn_scores(bank, labels, bank, 5), labels)) == {"top1"}


def test_subsets_are_evenly_spaced_and_class_balanced(tmp_path):
    data = knn.KnnData(str(labelled_folder(tmp_path, 10, 4)), 32, bank_size=15, query_size=6)
    assert len(data.bank) == 15 and len(data.queries) == 6
    assert torch.bincount(data.bank_labels).tolist() == [5, 5, 5]
    assert torch.bincount(data.query_labels).tolist() == [2, 2, 2]
    full = knn.KnnData(str(tmp_path), 32)
    chosen = evenly_spaced(15, 30)
    assert data.bank.samples == [full.bank.samples[i] for i in chosen]
    assert data.bank_labels.tolist() == [full.bank.targets[i] for i in chosen]
    assert [data.bank[i][1] for i in range(15)] == data.bank_labels.tolist()


def test_a_subset_holds_and_sends_its_own_images_alone(tmp_path):
    """A Subset kept the whole folder: ImageNet's 1.28M samples in every rank's memory for a bank of
    10,000, for the whole pre-training, and pickled to every loader worker at each scoring (where
    workers are spawned or forkserver-started: Python 3.14's default on Linux)."""
    data = knn.KnnData(str(labelled_folder(tmp_path, 10, 4)), 32, bank_size=3, query_size=3)
    shipped = pickle.loads(pickle.dumps(data.bank))
    assert len(shipped.samples) == len(shipped.imgs) == len(shipped.targets) == 3
    sent = pickle.dumps(data.loaders(batch_size=2, num_workers=0)[0].dataset)
    everything = knn.KnnData(str(tmp_path), 32).bank.samples
    assert len(everything) == 30 and data.bank.samples == [everything[i] for i in (0, 14, 29)]
    assert [path for path, _ in everything if path.encode() in sent] == [path for path, _ in data.bank.samples]


def test_mismatched_classes_are_refused(tmp_path):
    root = labelled_folder(tmp_path, 4, 2)
    (root / "val" / "cat").rename(root / "val" / "dog")
    with pytest.raises(UserError, match=r"--knn_data_path .*only in train: cat; only in val: dog"):
        knn.KnnData(str(root), 32, flag="--knn_data_path")


# ---------------------------------------------------------------------------------------------
# Encoders
def test_mae_encoder_loads_from_full_and_encoder_only_checkpoints(tmp_path):
    torch.manual_seed(0)
    trained = models_mae.mae_vit_tiny_patch4()
    torch.nn.init.normal_(trained.blocks[0].attn.qkv.weight)  # differ from a fresh initialisation
    full = trained.state_dict()
    encoder_only = {k: v for k, v in full.items() if not k.startswith(("decoder_", "mask_token"))}
    imgs = torch.randn(2, 3, 32, 32)
    expected = trained.eval().forward_features(imgs)
    for name, state in (("full", full), ("encoder", encoder_only)):
        torch.save({"model": state}, tmp_path / f"{name}.pth")
        torch.manual_seed(1)
        model = models_mae.mae_vit_tiny_patch4()
        load_mae_encoder(model, str(tmp_path / f"{name}.pth"))
        torch.testing.assert_close(model.eval().forward_features(imgs), expected, rtol=0, atol=0)
    del encoder_only["blocks.3.norm1.weight"]
    torch.save({"model": encoder_only}, tmp_path / "broken.pth")
    with pytest.raises(UserError, match=r"broken.pth lacks encoder weights \['blocks.3.norm1.weight'\]"):
        load_mae_encoder(models_mae.mae_vit_tiny_patch4(), str(tmp_path / "broken.pth"))


def test_accuracy_counts_the_true_class_among_the_top_1_and_the_top_5_scores():
    """7 classes, five queries of class 0, which their scores rank 1st, 2nd, 5th, 6th and 7th."""
    scores = torch.zeros(5, 7)
    for row, rank in enumerate((0, 1, 4, 5, 6)):
        order = [1, 2, 3, 4, 5, 6]
        order.insert(rank, 0)  # the classes from the highest score down
        scores[row, order] = torch.arange(7, 0, -1.0)
    assert knn.accuracy(scores, torch.zeros(5, dtype=torch.long)) == pytest.approx({"top1": 20.0, "top5": 60.0})


def test_the_read_outs_are_the_class_token_and_the_mean_of_the_patch_tokens():
    tokens = torch.tensor([[[9.0, -9.0], [1.0, 2.0], [3.0, 6.0]]])  # [1, 1 + 2 patches, 2]: the class token first
    features = knn.pooled_features(tokens)
    assert features["cls"].tolist() == [[9.0, -9.0]] and features["avg"].tolist() == [[2.0, 4.0]]


def test_features_are_l2_normalised_before_the_vote():
    """The vote compares cosines: embed() scales every feature to unit length, keeping its direction."""
    images = torch.tensor([[3.0, 4.0], [0.0, -0.5]])
    features = knn.embed(lambda x: {"x": x}, [(images, torch.zeros(2))], 2, torch.device("cpu"))
    torch.testing.assert_close(features["x"], torch.tensor([[0.6, 0.8], [0.0, -1.0]]))


def test_forward_features_equals_the_unmasked_encoder():
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch4().eval()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.arange(64.0).repeat(2, 1)  # sorted noise: the masking keeps the original order
    masked, _, _ = model.forward_encoder(imgs, mask_ratio=0.0, noise=noise)
    torch.testing.assert_close(model.forward_features(imgs), masked)


# ---------------------------------------------------------------------------------------------
# Command lines
def _knn_eval(data: Path, out: Path, *extra: str, ranks: int = 1):
    """knn_eval.py's main on these flags, in this process or in ``ranks`` forked processes that
    form a gloo group as torchrun's would (helpers.run_ranks); the JSON lines it wrote."""
    argv = ["--data_path", str(data), "--model", "mae_vit_tiny_patch4", "--device", "cpu", "--num_workers", "0"]
    argv += ["--batch_size", "8", "--output", str(out), *extra]
    if ranks > 1:
        run_ranks(lambda: knn_eval.main(knn_eval.get_args_parser().parse_args(argv)), out.parent / "ranks", ranks)
    else:
        with torch_threads(1):  # as the ranks and the pre-training runs
            knn_eval.main(knn_eval.get_args_parser().parse_args(argv))
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_two_processes_score_as_one(tmp_path):
    data = labelled_folder(tmp_path / "data", 12, 5)  # 36 bank and 15 queries: shards of unequal size
    one = _knn_eval(data, tmp_path / "one.json", "--encoders", "random", "pixels", "--knn_k", "5")
    two = _knn_eval(data, tmp_path / "two.json", "--encoders", "random", "pixels", "--knn_k", "5", ranks=2)
    assert [r["processes"] for r in one + two] == [1, 1, 2, 2]
    for a, b in zip(one, two, strict=True):
        assert a["encoder"] == b["encoder"]
        scores = {k: v for k, v in a.items() if k.endswith(("top1", "top5"))}
        assert scores and scores == {k: b[k] for k in scores}, (a, b)
    assert {"cls_top1", "avg_top1"} <= set(one[0]) and "pixels_top1" in one[1]


def test_an_encoder_file_one_rank_lacks_stops_both_ranks_in_one_line(tmp_path):
    """The file was checked before joining the process group: the rank without it stopped alone and
    rank 0 waited for it at the rendezvous (300 s, then a line that named no file)."""
    data = labelled_folder(tmp_path / "data", 4, 2)
    (tmp_path / "enc.pth").write_bytes(b"not read: the check comes first")

    (tmp_path / "other-node").mkdir()

    def main() -> None:  # the same path on each rank; each in a folder of its own (its node's disk)
        os.chdir(tmp_path if os.environ["RANK"] == "0" else tmp_path / "other-node")
        argv = ["--data_path", str(data), "--model", "mae_vit_tiny_patch4", "--encoders", "enc.pth"]
        knn_eval.main(knn_eval.get_args_parser().parse_args(argv + ["--device", "cpu"]))

    logs = run_ranks(main, tmp_path / "ranks", 2, timeout=60, exit_codes=(2, 2))
    for log in logs:
        (line,) = [line for line in log.splitlines() if line.startswith("error:")]
        assert line.startswith("error: --encoders enc.pth: rank(s) 1 of 2 see no such file"), log
        assert "Traceback" not in log, log


def test_an_encoder_after_the_first_one_rank_cannot_read_stops_both_ranks_in_one_line(tmp_path):
    """The flags of the encoders after the first were read by each rank alone: rank 1 stopped on its
    damaged copy, and rank 0 ended saying another process stopped and to restart with --resume auto."""
    data = labelled_folder(tmp_path / "data", 4, 2)
    for node in (tmp_path / "node0", tmp_path / "node1"):
        node.mkdir()
        torch.save({"model": {"w": torch.ones(2)}}, node / "first.pth")  # opened, not loaded into a model
        torch.save({"model": {"w": torch.ones(2)}}, node / "second.pth")
    whole = (tmp_path / "node1" / "second.pth").read_bytes()
    (tmp_path / "node1" / "second.pth").write_bytes(whole[: len(whole) // 2])

    def main() -> None:  # the same paths on each rank, each in its node's folder
        os.chdir(tmp_path / f"node{os.environ['RANK']}")
        argv = ["--data_path", str(data), "--model", "mae_vit_tiny_patch4", "--encoders", "first.pth", "second.pth"]
        knn_eval.main(knn_eval.get_args_parser().parse_args(argv + ["--device", "cpu"]))

    logs = run_ranks(main, tmp_path / "ranks", 2, timeout=60, exit_codes=(2, 2))
    for log in logs:
        (line,) = [line for line in log.splitlines() if line.startswith("error:")]
        assert line.startswith(
            "error: --encoders second.pth: rank(s) 1 of 2 cannot read it (checkpoint second.pth is truncated"
        ), log
        assert line.endswith("rank(s) 0 can: every node of the job must see the same files; " + SHARED_CHECKPOINT)
        assert "Traceback" not in log, log


def test_an_output_rank_0_refuses_stops_both_ranks_in_its_line(tmp_path):
    """Rank 0 alone checks --output (it alone writes it): rank 1 went on, and ended saying that another
    process stopped and to 'restart the whole job with --resume auto', which knn_eval has not."""
    data = labelled_folder(tmp_path / "data", 4, 2)
    (tmp_path / "scores.json").write_text("not JSON lines\n")

    def main() -> None:
        argv = ["--data_path", str(data), "--model", "mae_vit_tiny_patch4", "--encoders", "random", "--device", "cpu"]
        knn_eval.main(knn_eval.get_args_parser().parse_args([*argv, "--output", str(tmp_path / "scores.json")]))

    logs = run_ranks(main, tmp_path / "ranks", 2, timeout=60, exit_codes=(2, 2))
    for log in logs:
        (line,) = [line for line in log.splitlines() if line.startswith("error:")]
        assert line.startswith(f"error: --output {tmp_path / 'scores.json'}"), log
        assert "Traceback" not in log and "--resume" not in log, log


@pytest.mark.parametrize("encoders", [["random"], ["random", "pixels"]])
def test_an_output_rank_0_cannot_write_stops_both_ranks_in_its_line(tmp_path, encoders):
    """A full disk under rank 0's --output line: rank 1 went on to the next encoder and ended saying
    another process stopped and to 'restart the whole job with --resume auto' (knn_eval has none), or,
    after the last encoder, exited 0 as if the job had succeeded."""
    import errno

    data = labelled_folder(tmp_path / "data", 4, 2)
    output = tmp_path / "scores.json"

    def full_disk(path: str, text: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", path)

    def main() -> None:
        if os.environ["RANK"] == "0":
            knn_eval.atomic_append = full_disk
        argv = ["--data_path", str(data), "--model", "mae_vit_tiny_patch4", "--device", "cpu", "--num_workers", "0"]
        knn_eval.main(knn_eval.get_args_parser().parse_args([*argv, "--encoders", *encoders, "--output", str(output)]))

    logs = run_ranks(main, tmp_path / "ranks", 2, timeout=60, exit_codes=(2, 2))
    for log in logs:
        (line,) = [line for line in log.splitlines() if line.startswith("error:")]
        assert (
            line == f"error: --output {output}: cannot write it (No space left on device); the file is left as it "
            "was: free some space or give another path"
        ), log


def test_a_rank_whose_image_is_corrupt_leaves_the_other_advice_knn_eval_can_follow(tmp_path):
    """A corrupt bank image in rank 1's share, two `python knn_eval.py` processes as torchrun starts them:
    rank 0 said 'restart the whole job with --resume auto to continue from its last checkpoint', a flag
    knn_eval has not (and no checkpoints)."""
    import subprocess
    import sys

    data = labelled_folder(tmp_path / "data", 4, 2)
    sorted((data / "train").rglob("*.jpg"))[1].write_bytes(b"not an image")  # rank 1 reads items 1, 3, ...
    argv = [sys.executable, "knn_eval.py", "--data_path", str(data), "--model", "mae_vit_tiny_patch4"]
    argv += ["--encoders", "random", "--device", "cpu", "--num_workers", "0"]
    with started_ranks(argv, stdout=subprocess.DEVNULL) as ranks:
        errors = [rank.communicate(timeout=120)[1] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [1, 2], errors
    assert errors[0].splitlines()[-1] == (
        f"error: another process of this job stopped, so rank 0 of 2 cannot go on; {knn_eval.PEER_ADVICE}"
    ), errors[0]
    assert errors[1].splitlines()[-1].startswith("error: cannot read image "), errors[1]


def test_pretraining_logs_knn_scores_and_they_match_knn_eval(tmp_path):
    data = labelled_folder(tmp_path / "data", 8, 4)
    out = tmp_path / "run"
    run_pretrain(
        data, out, "--epochs", "3", "--knn_data_path", str(data), "--knn_freq", "2", "--knn_k", "5", "--vis_freq", "0"
    )
    log = read_log(out)
    assert ["knn_cls_top1" in line for line in log] == [False, True, True]  # epoch 1, and the last
    assert all(0 <= line["knn_avg_top1"] <= 100 for line in log[1:])
    # The standalone evaluation of the last checkpoint gives the monitor's numbers.
    assert load(out / "checkpoint-2.pth")["epoch"] == 2
    (record,) = _knn_eval(data, tmp_path / "eval.json", "--encoders", str(out / "checkpoint-2.pth"), "--knn_k", "5")
    assert (record["cls_top1"], record["avg_top1"]) == (log[2]["knn_cls_top1"], log[2]["knn_avg_top1"])
    # Scoring drew nothing from the stream the masks come from: the weights are those of a run without the monitor.
    plain = tmp_path / "plain"
    run_pretrain(data, plain, "--epochs", "3", "--vis_freq", "0")
    assert_same(load(out / "checkpoint-2.pth")["model"], load(plain / "checkpoint-2.pth")["model"])


def test_the_monitor_says_the_k_it_votes_with_where_the_bank_is_smaller(tmp_path, capsys):
    """--knn_k beyond the bank: the vote takes the whole bank, as knn_eval.py warns; the monitor said nothing and
    logged the flag's k."""
    data = labelled_folder(tmp_path / "data", 8, 1)
    flags = ["--epochs", "1", "--knn_data_path", str(data), "--knn_bank_size", "6", "--knn_k", "20", "--vis_freq", "0"]
    run_pretrain(data, tmp_path / "run", *flags)
    printed = capsys.readouterr()
    assert "--knn_k 20 is more than the 6 bank images: k = 6" in printed.out + printed.err
    assert "k-NN (k=6, t=0.07) after epoch 0" in printed.out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--knn_data_path", "{missing}"], "--knn_data_path {missing} does not exist"),
        (["--knn_data_path", "{noval}"], "--knn_data_path {noval} has no 'val/test' folder"),
        (["--knn_data_path", "{data}", "--knn_k", "0"], "--knn_k must be at least 1"),
        (["--knn_data_path", "{data}", "--knn_freq", "0"], "--knn_freq must be at least 1"),
    ],
)
def test_bad_knn_flags_are_refused_before_training(tmp_path, flags, message):
    """Refused in one line, before training."""
    data = labelled_folder(tmp_path / "data", 4, 2)
    noval = tmp_path / "noval"
    shutil.copytree(data / "train", noval / "train")
    paths = {"missing": str(tmp_path / "missing"), "noval": str(noval), "data": str(data)}
    extra = ["--epochs", "1", *[f.format(**paths) for f in flags]]
    with isolated_interrupts():
        refused = one_line_error(lambda: run_pretrain(data, tmp_path / "out", *extra))
    assert refused.startswith(message.format(**paths)), refused
    assert not (tmp_path / "out" / "checkpoint-0.pth").exists()  # refused before training


def test_knn_eval_refuses_an_encoder_of_other_channels_in_one_line(tmp_path):
    """knn_eval.py reads RGB images (docs/own-data.md: it takes RGB models). Was: "checkpoint ...
    stores --mean 0.5: 1 value(s) for images of 3 channels ...; give --mean and --std", advice
    that only led to a second error, the weights' shapes."""
    data = labelled_folder(tmp_path / "data", 2, 1)
    torch.manual_seed(0)
    gray = tmp_path / "gray.pth"
    saved = argparse.Namespace(model="mae_vit_tiny_patch4", input_size=32, in_chans=1, mean=[0.5], std=[0.25])
    torch.save({"model": models_mae.mae_vit_tiny_patch4(img_size=32, in_chans=1).state_dict(), "args": saved}, gray)
    for extra in ([], ["--mean", "0.5", "0.5", "0.5", "--std", "0.2", "0.2", "0.2"]):
        argv = ["--data_path", str(data), "--encoders", "random", str(gray), "--device", "cpu", *extra]
        refused = one_line_error(knn_eval.main, knn_eval.get_args_parser().parse_args(argv))
        assert refused == (
            f"checkpoint {gray} was pre-trained on 1-channel images (--in_chans 1); knn_eval.py scores RGB encoders "
            f"only: use the k-NN monitor of main_pretrain.py (--knn_data_path)"
        )


@pytest.mark.parametrize("first", [True, False], ids=["first", "later"])
def test_knn_eval_calls_a_folder_given_as_encoder_a_folder(tmp_path, first):
    """As export.py, reconstruct.py and --finetune do; it was 'is neither a checkpoint file nor 'random' or
    'pixels'; check its path', of a path that exists (a transformers folder, an --output_dir)."""
    data = labelled_folder(tmp_path / "data", 2, 1)
    folder = tmp_path / "mae_hf"
    folder.mkdir()
    encoders = [str(folder)] if first else ["random", str(folder)]
    argv = ["--data_path", str(data), "--model", "mae_vit_tiny_patch4", "--encoders", *encoders, "--device", "cpu"]
    refused = one_line_error(knn_eval.main, knn_eval.get_args_parser().parse_args(argv))
    assert refused.startswith(f"checkpoint {folder} is a folder, not a checkpoint file"), refused
    assert "export.py --from hf" in refused


# ---------------------------------------------------------------------------------------------
# Official releases store weights only: knn_eval takes --model and --input_size from them
@pytest.mark.parametrize(
    "kind, flags", [("full", []), ("encoder", []), ("classifier", []), ("encoder", ["--model", "mae_vit_tiny_patch4"])]
)
def test_knn_eval_takes_model_and_size_of_an_official_checkpoint_from_its_weights(tmp_path, kind, flags):
    """Was: the fallback mae_vit_mini_patch4 at 32 px, whose load refused the weights ('does not fit
    MaskedAutoencoderViT ...; check --model'); and with --model, its default 32 px, the 48-px position
    embeddings resized. As in reconstruct.py, the weights decide where neither flag nor args do."""
    data = labelled_folder(tmp_path / "data", 2, 1)
    torch.manual_seed(0)
    path = tmp_path / f"{kind}.pth"
    torch.save({"model": official_layouts(48)[kind]}, path)
    argv = ["--data_path", str(data), "--encoders", str(path), "--device", "cpu", "--num_workers", "0", *flags]
    args = knn_eval.get_args_parser().parse_args([*argv, "--knn_k", "3", "--output", str(tmp_path / "knn.json")])
    knn_eval.main(args)
    assert (args.model, args.input_size) == ("mae_vit_tiny_patch4", 48)
    (record,) = [json.loads(line) for line in (tmp_path / "knn.json").read_text().splitlines()]
    assert record["model"] == "mae_vit_tiny_patch4" and 0 <= record["cls_top1"] <= 100


def test_official_checkpoint_shapes_give_their_model_at_224_px():
    """The official ViT-B/16 releases' names and shapes (../shared/spec; meta tensors), full or fine-tuned,
    are mae_vit_base_patch16 at 224 px. The layouts above have their names (block indices aside)."""
    spec = load_spec()

    def names(keys) -> set[str]:
        return {re.sub(r"blocks\.\d+\.", "blocks.N.", k) for k in keys}

    ours = official_layouts(32)
    assert names(ours["full"]) == names(spec["mae_vit_base_patch16"])
    assert names(ours["classifier"]) == names(spec["vit_base_patch16_cls"])
    assert names(ours["encoder"]) == {k for k in names(ours["full"]) if not k.startswith(("decoder_", "mask_token"))}
    for release in ("mae_vit_base_patch16", "vit_base_patch16_cls", "vit_base_patch16_gp"):
        state = {k: torch.empty(shape, device="meta") for k, shape in spec[release].items()}
        args = argparse.Namespace(model=None, input_size=None)
        fill_from_checkpoints(args, [Opened(release, {"model": state})], knn_eval.FALLBACKS)
        assert (args.model, args.input_size) == ("mae_vit_base_patch16", 224), release


@pytest.mark.parametrize("change", ["a block less", "8x16 patches"])
def test_knn_eval_refuses_weights_that_fit_no_model_in_one_line(tmp_path, change):
    """Weights of no registered encoder, or of a grid no square image has (8x16 or 16x8?), without --model."""
    data = labelled_folder(tmp_path / "data", 2, 1)
    state = official_layouts(32)["encoder"]
    if change == "a block less":
        state = {k: v for k, v in state.items() if not k.startswith("blocks.11.")}
    else:
        state["pos_embed"] = torch.zeros(1, 8 * 16 + 1, 192)
    path = tmp_path / "unknown.pth"
    torch.save({"model": state}, path)
    argv = ["--data_path", str(data), "--encoders", str(path), "--device", "cpu"]
    refused = one_line_error(knn_eval.main, knn_eval.get_args_parser().parse_args(argv))
    assert refused == (
        f"checkpoint {path} stores no --model, and its weights fit no known encoder (at a square image "
        f"size); give --model"
    )


@pytest.mark.parametrize("flags", [[], ["--model", "mae_vit_tiny_patch4", "--input_size", "32"]])
def test_knn_eval_refuses_official_weights_of_other_channels_as_stored_ones(tmp_path, flags):
    """A checkpoint without args whose patch embedding takes 1 channel: as one that stores --in_chans 1
    (test_knn_eval_refuses_an_encoder_of_other_channels_in_one_line). Was: the RGB model of its shapes, whose
    load refused the weights with 'check --model', advice that named the wrong cause."""
    data = labelled_folder(tmp_path / "data", 2, 1)
    gray = tmp_path / "gray.pth"
    torch.save({"model": models_mae.mae_vit_tiny_patch4(img_size=32, in_chans=1).state_dict()}, gray)
    argv = ["--data_path", str(data), "--encoders", str(gray), "--device", "cpu", *flags]
    refused = one_line_error(knn_eval.main, knn_eval.get_args_parser().parse_args(argv))
    assert refused == (
        f"checkpoint {gray} holds an encoder of 1-channel images (its patch embedding's weights); knn_eval.py scores "
        f"RGB encoders only: use the k-NN monitor of main_pretrain.py (--knn_data_path)"
    )


def test_knn_eval_refuses_official_weights_of_other_channels_listed_after_an_rgb_encoder(tmp_path):
    """The same refusal for a 1-channel release listed after an RGB checkpoint, before any encoder is scored: every
    --encoders entry's weights are checked, by their shapes (memory-mapped, not read). Was: only the first entry's,
    and this one's load, after the first was scored, blamed --model."""
    data = labelled_folder(tmp_path / "data", 2, 1)
    gray, rgb, output = tmp_path / "gray.pth", tmp_path / "rgb.pth", tmp_path / "knn.json"
    torch.save({"model": models_mae.mae_vit_tiny_patch4(img_size=32, in_chans=1).state_dict()}, gray)
    torch.save({"model": models_mae.mae_vit_tiny_patch4(img_size=32).state_dict()}, rgb)
    argv = ["--data_path", str(data), "--encoders", str(rgb), str(gray), "--device", "cpu", "--output", str(output)]
    refused = one_line_error(knn_eval.main, knn_eval.get_args_parser().parse_args(argv))
    assert refused == (
        f"checkpoint {gray} holds an encoder of 1-channel images (its patch embedding's weights); knn_eval.py scores "
        f"RGB encoders only: use the k-NN monitor of main_pretrain.py (--knn_data_path)"
    )
    assert not output.exists()  # the RGB encoder was not scored first


def test_knn_eval_holds_one_later_encoders_weights_at_a_time_while_checking_them(tmp_path, monkeypatch):
    """The later --encoders are checked (channels, flags) before any is scored, each from its file; a .safetensors
    one is loaded whole for that (only a zip is memory-mapped), so each is let go once checked. Was: every later
    encoder's weights were held until the last was read, as many copies in memory at once as --encoders lists."""
    import gc
    import weakref

    from safetensors.torch import save_file

    data = labelled_folder(tmp_path / "data", 2, 1)
    first = tmp_path / "first.pth"
    torch.save({"model": models_mae.mae_vit_tiny_patch4(img_size=32).state_dict()}, first)
    later = [tmp_path / f"later{i}.safetensors" for i in range(3)]
    for path in later:
        save_file(models_mae.mae_vit_tiny_patch4(img_size=32).state_dict(), str(path))
    peek, held, alive_at_each = knn_eval.peek_checkpoint, [], []

    def peek_noting_what_is_held(path: str) -> dict:
        gc.collect()
        alive_at_each.append(sum(ref() is not None for ref in held))
        ckpt = peek(path)
        held.append(weakref.ref(ckpt["model"]["patch_embed.proj.weight"]))
        return ckpt

    monkeypatch.setattr(knn_eval, "peek_checkpoint", peek_noting_what_is_held)
    argv = ["--data_path", str(data), "--encoders", str(first), *map(str, later), "--device", "cpu"]
    args = knn_eval.get_args_parser().parse_args(argv)
    knn_eval.check_args(args)
    knn_eval.settle(args, args.encoders)
    assert alive_at_each == [0, 0, 0]


def test_knn_eval_refuses_a_1_channel_encoder_imported_from_hf_first_or_later(tmp_path):
    """export.py --to hf then --from hf of a 1-channel MAE: the import stores the folder's channels as --in_chans,
    and knn_eval refuses it in its RGB line wherever it is listed. Was: the import stored the run's one --mean
    but no --in_chans, and knn_eval blamed that --mean ('give --mean and --std'), which could not help."""
    import export

    data = labelled_folder(tmp_path / "data", 2, 1)
    gray = tmp_path / "gray.pth"
    model = models_mae.mae_vit_mini_patch4(in_chans=1)
    saved = argparse.Namespace(model="mae_vit_mini_patch4", input_size=32, in_chans=1, mean=[0.5], std=[0.25])
    torch.save({"model": model.state_dict(), "args": saved}, gray)
    for argv in (
        ["--to", "hf", "--checkpoint", str(gray), "--output", str(tmp_path / "hf")],
        ["--from", "hf", "--checkpoint", str(tmp_path / "hf"), "--output", str(tmp_path / "back.pth")],
    ):
        export.main(export.get_args_parser().parse_args(argv))
    back, rgb = tmp_path / "back.pth", tmp_path / "rgb.pth"
    torch.save({"model": models_mae.mae_vit_mini_patch4().state_dict(), "args": argparse.Namespace(input_size=32)}, rgb)
    for encoders in ([str(back)], [str(rgb), str(back)]):
        argv = ["--data_path", str(data), "--encoders", *encoders, "--device", "cpu"]
        refused = one_line_error(knn_eval.main, knn_eval.get_args_parser().parse_args(argv))
        assert refused == (
            f"checkpoint {back} was pre-trained on 1-channel images (--in_chans 1); knn_eval.py scores RGB encoders "
            f"only: use the k-NN monitor of main_pretrain.py (--knn_data_path)"
        )
    # An import made before --in_chans was stored: its weights decide, as for a checkpoint without args.
    old = tmp_path / "old_import.pth"
    del saved.in_chans
    torch.save({"model": model.state_dict(), "args": saved}, old)
    argv = ["--data_path", str(data), "--encoders", str(old), "--device", "cpu"]
    refused = one_line_error(knn_eval.main, knn_eval.get_args_parser().parse_args(argv))
    assert refused.startswith(f"checkpoint {old} holds an encoder of 1-channel images (its patch embedding's weights)")


@pytest.mark.parametrize(
    "pos_embed, expected",
    [
        ([1, 0, 192], "position embedding has -1 grid tokens, not a square grid"),
        ([1, 1, 192], "position embedding has 0 grid tokens, not a square grid"),
        ([65, 192], "of another shape ['pos_embed'] (e.g. pos_embed: (65, 192) vs (1, 65, 192))"),
    ],
)
def test_a_position_embedding_of_no_grid_is_refused_in_one_line(tmp_path, pos_embed, expected):
    """With --model given the weights are loaded as they are: a position embedding of no grid token (a
    traceback: the square root of -1 tokens, or a 0x0 grid to resize) or without its batch dimension (its
    192 channels were taken for 191 tokens) is named in one line."""
    data = labelled_folder(tmp_path / "data", 2, 1)
    state = official_layouts(32)["encoder"] | {"pos_embed": torch.zeros(pos_embed)}
    path = tmp_path / "odd.pth"
    torch.save({"model": state}, path)
    argv = ["--data_path", str(data), "--encoders", str(path), "--device", "cpu", "--model", "mae_vit_tiny_patch4"]
    refused = one_line_error(knn_eval.main, knn_eval.get_args_parser().parse_args(argv))
    assert refused.startswith(f"checkpoint {path}") and expected in refused, refused


# ---------------------------------------------------------------------------------------------
# The linear classifier on cached features
def test_linear_classifier_separates_separable_features_and_not_shuffled_ones():
    train_x, train_y = _clusters(100, 10, 0.05, seed=1)
    test_x, test_y = _clusters(50, 10, 0.05, seed=2)
    assert linear_accuracy(train_x, train_y, test_x, test_y, 10, epochs=20) == 100.0
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(3))]
    assert 2.0 < linear_accuracy(train_x, shuffled, test_x, test_y, 10, epochs=20) < 20.0  # chance: 10%


def test_linear_classifier_steps_over_every_sample_on_the_cosine_lr(monkeypatch):
    # 5 samples in batches of 2, 2 epochs: 3 steps an epoch (the last on 1 sample), each at
    # lr * (1 + cos(pi * step / 6)) / 2 of the docstring's cosine from lr to 0.
    batches, lrs = [], []
    cross_entropy = F.cross_entropy

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):
            lrs.append(self.param_groups[0]["lr"])
            return super().step(closure)

    def recording_cross_entropy(logits, target):
        batches.append(len(target))
        return cross_entropy(logits, target)

    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
    monkeypatch.setattr(F, "cross_entropy", recording_cross_entropy)
    x, y = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 0, 1, 0])
    linear_accuracy(x, y, x, y, 2, epochs=2, lr=0.3, batch_size=2)
    assert batches == [2, 2, 1] * 2
    assert lrs == pytest.approx([0.3 * (1 + math.cos(math.pi * step / 6)) / 2 for step in range(6)])


def test_linear_classifier_needs_a_direction_knn_misses():
    # Class is the sign of feature 0, whose spread is tiny next to 15 noise features: a linear
    # classifier finds it (after standardisation), nearest neighbours by cosine mostly do not.
    g = torch.Generator().manual_seed(0)

    def sample(n):
        y = torch.randint(0, 2, (n,), generator=g)
        x = torch.randn(n, 16, generator=g)
        x[:, 0] = (2 * y - 1) * (0.5 + torch.rand(n, generator=g)) * 0.05
        return F.normalize(x, dim=1), y

    (train_x, train_y), (test_x, test_y) = sample(2000), sample(500)
    assert linear_accuracy(train_x, train_y, test_x, test_y, 2, epochs=30) > 97.0
    assert knn.accuracy(knn.knn_scores(train_x, train_y, test_x, 2), test_y)["top1"] < 75.0


def _tensorboard(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows of ``folder``'s runs: each scalar's (x, value) points; the pictures' x."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    shown = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return {**shown, "pictures": [(e.step, 0.0) for e in acc.Images("reconstructions")]}


@pytest.mark.parametrize("in_chans", [1, 3], ids=["rgb-image-in-gray-run", "corrupt-image"])
def test_a_failing_knn_score_costs_no_training_and_the_resumed_run_scores_it(tmp_path, in_chans):
    """A k-NN image that cannot be read (read only when scoring: a file damaged during the run; an RGB image in a
    gray run's k-NN data) stopped pre-training before the epoch's checkpoint, losing the epoch, and in a gray run
    advised --in_chans 3, which would have read its gray training data as RGB. Now the epoch is saved first; the
    run resumed with --resume auto scores it, and ends as the uninterrupted run: weights, log.txt with the k-NN
    scores, TensorBoard and the pictures."""
    data = labelled_folder(tmp_path / "data", 6, 2)
    if in_chans == 1:
        for image in data.rglob("*.jpg"):
            Image.open(image).convert("L").save(image)
    knn_data = data / "val" / "cat" / sorted(os.listdir(data / "val" / "cat"))[0]
    flags = ["--model", "mae_vit_mini_patch4", "--batch_size", "8", "--epochs", "2", "--warmup_epochs", "1"]
    flags += ["--knn_data_path", str(data), "--knn_freq", "1", "--knn_k", "3", "--vis_freq", "1", "--resume", "auto"]
    flags += ["--in_chans", "1", "--mean", "0.5", "--std", "0.25"] if in_chans == 1 else []
    whole = tmp_path / "whole"
    run_pretrain(data, whole, *flags)

    good = knn_data.read_bytes()
    if in_chans == 1:  # an image of other channels
        Image.open(io.BytesIO(good)).convert("RGB").save(knn_data, format="JPEG")
        message = (
            f"image {knn_data} has 3 channel(s) (mode RGB) but the model that --knn_data_path scores takes 1; "
            f"convert it to grayscale (mode L or I;16)"
        )
    else:  # damaged: as during a run, since its start lists the k-NN images and reads none
        knn_data.write_bytes(b"not a picture")
        message = f"cannot read image {knn_data} "
    out = tmp_path / "out"
    with isolated_interrupts():
        refused = one_line_error(lambda: run_pretrain(data, out, *flags))
    assert refused.startswith(message), refused
    assert checkpoint_names(out) == {"checkpoint-0.pth"} and read_log(out) == []  # its line comes with the scores
    assert load(out / "checkpoint-0.pth")["extra"]["unevaluated"]["epoch"] == 0  # trained, saved, not yet scored
    knn_data.write_bytes(good)
    run_pretrain(data, out, *flags)

    log = read_log(whole)
    assert [line["epoch"] for line in log] == [0, 1] and all("knn_cls_top1" in line for line in log)
    assert read_log(out) == log
    final, resumed = load(whole / "checkpoint-1.pth"), load(out / "checkpoint-1.pth")
    assert "unevaluated" not in resumed["extra"] and resumed["log"] == final["log"] == log
    assert_same(resumed["model"], final["model"], "model")
    assert_same(resumed["optimizer"], final["optimizer"], "optimizer")
    assert _tensorboard(out) == _tensorboard(whole)
    assert sorted(p.name for p in out.glob("*.png")) == ["reconstruction-0.png", "reconstruction-1.png"]
