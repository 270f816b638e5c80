"""Submit main_pretrain.py to SLURM with submitit (see util/cli/launcher.py and the README):
python submitit_pretrain.py --nodes 8 --ngpus 8 --job_dir ./jobs/%j <main_pretrain.py flags>"""

from util.cli.errors import run_cli
from util.cli.launcher import submit

if __name__ == "__main__":
    run_cli(lambda: submit("main_pretrain", "MAE pre-training"))
