"""The fault campaign (tests/fault_campaign.py) at CI size: kill -9 in training, inside checkpoint
writes, renames and pruning, and while log.txt is written; a truncated or bit-flipped newest
checkpoint; a full disk under a writer; Ctrl-C once and twice; an accumulation remainder. Every
checkpoint must load after every fault, a run that ends by itself must say why in one line, and
every trial must end bitwise equal to an uninterrupted run, with each epoch once in log.txt.

3 trials of 5 faults draw each of the 14 kinds once (a full disk under one writer; the writers are
drawn in turn, and `python tests/fault_campaign.py --kinds full-disk --trials 12 --seed 12` hits
each of them, see docs/what-survives-what.md). More trials by hand:
MAE_FAULT_TRIALS=60 MAE_FAULT_SEED=11 pytest tests/test_fault_campaign.py -s
(or python tests/fault_campaign.py --trials 60 --seed 11 --faults 5).
"""

import json
import os

import fault_campaign
from helpers import isolated_interrupts, torch_threads

TRIALS = int(os.environ.get("MAE_FAULT_TRIALS", "3"))
SEED = int(os.environ.get("MAE_FAULT_SEED", "0"))
FAULTS_PER_TRIAL = 5


def test_fault_campaign(tmp_path, pretrain_reference):
    # In this process, which has imported torch already: the campaign forks every run from its
    # driver, and this process can be that driver (its command line only parses these numbers).
    with torch_threads(1), isolated_interrupts():
        result = fault_campaign.campaign(TRIALS, SEED, FAULTS_PER_TRIAL, tmp_path, pretrain_reference)
    print(json.dumps(result, indent=1))
    assert not result["failures"], "\n".join(result["failures"])
    # The kinds are drawn in turn: 15 faults draw each of the 14 once. Most fire (a run resumed late
    # can end before its chosen moment).
    if TRIALS * FAULTS_PER_TRIAL >= len(result["drawn"]):
        assert min(result["drawn"].values()) >= 1, result["drawn"]
    assert sum(result["faults"].values()) >= TRIALS, result["faults"]
