"""The fault campaign (tests/fault_campaign.py) at CI size: kill -9 in training, inside checkpoint
writes, renames and pruning, and while log.txt is written; a truncated or bit-flipped newest
checkpoint; a full disk under a writer; Ctrl-C once and twice; an accumulation remainder. Every
checkpoint must load after every fault, a run that ends by itself must say why in one line, and
every trial must end bitwise equal to an uninterrupted run, with each epoch once in log.txt.

Pre-training: 3 trials of 5 faults draw each of the 14 kinds once (a full disk under one writer; the
writers are drawn in turn, and `python tests/fault_campaign.py --kinds full-disk --trials 12 --seed 12`
hits each of them, see docs/what-survives-what.md). Fine-tuning: 2 trials of 5 faults, among them a
kill after an epoch's evaluation; linear probing: 1 trial. More trials by hand:
MAE_FAULT_TRIALS=60 MAE_FAULT_SEED=11 pytest tests/test_fault_campaign.py -s
(or python tests/fault_campaign.py --trials 60 --seed 11 --faults 5, and --entry finetune or linprobe).
"""

import json
import os
from typing import Any

import fault_campaign
from helpers import Reference, isolated_interrupts, torch_threads

TRIALS = int(os.environ.get("MAE_FAULT_TRIALS", "3"))
SEED = int(os.environ.get("MAE_FAULT_SEED", "0"))
FAULTS_PER_TRIAL = 5


def _campaign(tmp_path, reference: Reference, trials: int, seed: int, entry: str) -> dict[str, Any]:
    # In this process, which has imported torch already: the campaign forks every run from its
    # driver, and this process can be that driver (its command line only parses these numbers).
    with torch_threads(1), isolated_interrupts():
        result = fault_campaign.campaign(trials, seed, FAULTS_PER_TRIAL, tmp_path, reference, entry=entry)
    print(json.dumps(result, indent=1))
    assert not result["failures"], "\n".join(result["failures"])
    # Most faults fire (a run resumed late can end before its chosen moment).
    assert sum(result["faults"].values()) >= trials, result["faults"]
    return result


def test_fault_campaign(tmp_path, pretrain_reference):
    result = _campaign(tmp_path, pretrain_reference, TRIALS, SEED, "pretrain")
    # The kinds are drawn in turn: 15 faults draw each of the 14 once.
    if TRIALS * FAULTS_PER_TRIAL >= len(result["drawn"]):
        assert min(result["drawn"].values()) >= 1, result["drawn"]


def test_fault_campaign_finetuning(tmp_path, pretrain_reference):
    # By default seed 4: (ckpt-after-rename, prune, ckpt-write, full-disk:log-append, log-append) and
    # (eval, ckpt-before-rename, ctrl-c, step, bit-flip), whose fresh run is killed after the n-th
    # evaluation: the next one evaluates that epoch again, best top-1 and log.txt as without the kill.
    result = _campaign(tmp_path, pretrain_reference, max(TRIALS // 3, 2), SEED + 4, "finetune")
    if SEED == 0:
        assert result["faults"].get("eval"), result["faults"]


def test_fault_campaign_linear_probing(tmp_path, pretrain_reference):
    # By default (ctrl-c-twice, log-append, ctrl-c, accum-remainder, step): kills and stops counted
    # in LARS's steps, the frozen encoder and BatchNorm statistics of the probe's head.
    _campaign(tmp_path, pretrain_reference, max(TRIALS // 3, 1), SEED, "linprobe")
