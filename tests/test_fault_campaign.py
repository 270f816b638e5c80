"""The fault campaign (tests/fault_campaign.py) at CI size: kill -9 in training, inside checkpoint
writes, renames and pruning, and while log.txt is written, plus a damaged newest checkpoint; every
checkpoint must load after every fault, and every trial must end bitwise equal to an uninterrupted
run, with each epoch once in log.txt.

More trials by hand: MAE_FAULT_TRIALS=100 MAE_FAULT_SEED=7 pytest tests/test_fault_campaign.py -s
(or python tests/fault_campaign.py --trials 100 --seed 7).
"""

import json
import os

from helpers import cli

TRIALS = int(os.environ.get("MAE_FAULT_TRIALS", "3"))
SEED = int(os.environ.get("MAE_FAULT_SEED", "0"))


def test_fault_campaign(tmp_path, pretrain_reference):
    report = tmp_path / "report.json"
    argv = ["tests/fault_campaign.py", "--trials", str(TRIALS), "--seed", str(SEED)]
    argv += ["--reference", str(pretrain_reference.out.parent)]
    done = cli([*argv, "--workdir", str(tmp_path / "work"), "--report", str(report)], timeout=600 + 60 * TRIALS)
    assert report.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(report.read_text())
    print(json.dumps(result, indent=1))
    assert not result["failures"], "\n".join(result["failures"])
    assert done.returncode == 0, done.stderr[-3000:]
    # With 3 faults a trial, in turn, the default 3 trials try each kind of fault once; most fire
    # (a run resumed late can end before its chosen moment).
    assert sum(result["faults"].values()) >= TRIALS, result["faults"]
