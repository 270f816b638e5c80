"""Submitting an entry point to SLURM (or to this machine) with submitit, one task per GPU.

On preemption or time-out, the job's training loop writes a checkpoint at its exact position;
the launcher then hands the signal to submitit, which requeues the same job with
``--resume auto``, so it continues from the newest good checkpoint in its output folder.
"""

import argparse
import copy
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

import submitit

from util.cli.args import check_at_least, check_common, check_world, default_workers
from util.cli.errors import UserError, fail
from util.cli.log import log
from util.cli.redact import redacted
from util.train import distributed, interrupt

CPUS_PER_TASK = 10  # each task's (a GPU's) CPUs: its process and its data loader's workers


def add_launcher_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("submitit")
    g.add_argument("--ngpus", default=8, type=int, help="number of GPUs to request on each node")
    g.add_argument("--nodes", default=2, type=int, help="number of nodes to request")
    g.add_argument("--timeout", default=4320, type=int, help="duration of the job, in minutes")
    g.add_argument("--job_dir", default="./submitit_jobs/%j", help="shared job and output folder (%%j: the job id)")
    g.add_argument("--partition", default="learnfair", help="SLURM partition")
    g.add_argument("--use_volta32", action="store_true", help="request 32 GB V100 GPUs")
    g.add_argument("--comment", default="", help="comment to pass to the scheduler")
    g.add_argument("--cluster", choices=["slurm", "local", "debug"], help="where to run (default: SLURM, else here)")
    g.add_argument("--tasks_per_node", type=int, help="processes per node (default: --ngpus; with --ngpus 0: CPU runs)")


class Trainer:
    """The submitted callable: runs ``<module>.main(args)`` in each task, and is checkpointable."""

    def __init__(self, module: str, args: argparse.Namespace):
        # The flags as given: main() derives values (lr, ranks, ...) on its own copy, afresh in a
        # requeued job. A job SLURM itself requeues (preemption) reruns these flags: let it resume
        # (each submission has its own %j folder, so there is nothing stale to resume from).
        self.module, self.args = module, copy.deepcopy(args)
        self.args.resume = self.args.resume or "auto"

    def __call__(self) -> None:
        args = copy.deepcopy(self.args)
        self._set_up_task(args)
        refused = None
        try:
            importlib.import_module(self.module).main(args)
            return
        except interrupt.Interrupted as stop:
            log.info(f"{stop}; handing over to submitit for requeueing")
        except UserError as error:  # the error again, without the traceback that holds the DDP wrapper
            refused = type(error)(redacted(str(error)))  # submitit writes it to the job's log
        distributed.cleanup_before_exit()
        if refused is not None:
            raise refused  # the task fails with its one line; a requeue would only fail again
        interrupt.hand_over()  # on its timeout signal submitit calls checkpoint() and requeues
        # Still here (SIGTERM: SLURM preempts and requeues the job itself): exit as stopped, not as a
        # job that completed.
        sys.exit(interrupt.exit_code())

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption/time-out: the same job again, resuming automatically."""
        args = copy.deepcopy(self.args)
        args.resume = "auto"
        return submitit.helpers.DelayedSubmission(type(self)(self.module, args))

    @staticmethod
    def _set_up_task(args: argparse.Namespace) -> None:
        job = submitit.JobEnvironment()
        # Rendezvous over TCP on the job's first node: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT, from
        # SLURM's variables of this task. Over values the job inherited from the shell that submitted it
        # (sbatch passes its environment on: a MASTER_ADDR exported for a plain srun run, say), which failed
        # every task once it had waited in the queue; a MASTER_PORT given there is kept.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        args.dist_url = "env://"
        args.output_dir = args.output_dir.replace("%j", str(job.job_id))
        # --log_dir as given (the official launcher replaced it by --output_dir: a --log_dir given was silently not
        # used, '' wrote TensorBoard events all the same); None is --output_dir's, as every run takes it (run.start).
        if args.log_dir:
            args.log_dir = args.log_dir.replace("%j", str(job.job_id))
        node_defaults(args)
        print(f"process group: {job.global_rank}/{job.num_tasks}, output in {args.output_dir}")


def node_defaults(args: argparse.Namespace) -> None:
    """The defaults that depend on the machine, taken in the job's task, on its node: ``--num_workers`` (its
    cores, as the entry point's default takes them; ``submit`` leaves it None where not given)."""
    if args.num_workers is None:
        args.num_workers = default_workers()


def tasks_per_node(args: argparse.Namespace) -> int:
    """The job's processes per node: --tasks_per_node, by default one per GPU (--ngpus)."""
    return args.tasks_per_node or args.ngpus


def check_flags(entry: ModuleType, args: argparse.Namespace) -> None:
    """The checks the job itself will make of its flags, made before it waits in the queue; a CUDA
    ``--device`` is checked on the job's nodes, which have the GPUs."""
    check_at_least(args, 1, "nodes", "timeout")
    check_at_least(args, 0, "ngpus")
    if args.tasks_per_node is not None:
        check_at_least(args, 1, "tasks_per_node")
    elif args.ngpus == 0:  # a task per GPU, and there are none
        fail("--ngpus 0 runs on CPUs: give --tasks_per_node N, the processes per node")
    tasks = tasks_per_node(args)
    # Each task of a GPU job takes the GPU of its local rank: the tasks beyond the node's GPUs stopped the job
    # at its start, once it had waited in the queue.
    if str(args.device).startswith("cuda") and tasks > args.ngpus:
        fail(
            f"--tasks_per_node {tasks} is more than the {args.ngpus} GPUs of a node (--ngpus): each task takes a "
            f"GPU of its own; give --tasks_per_node {args.ngpus} or less, or --device cpu"
        )
    checked = copy.copy(args)
    if str(args.device).startswith("cuda"):  # the nodes' GPUs are checked there, with what they take (fp16)
        checked.device, checked.precision = "cpu", "fp32"
    if args.num_workers is None:  # the job's node's default (node_defaults)
        checked.num_workers = 0
    checked.output_dir = args.job_dir  # the job's --output_dir (submit sets it): checked as the job will
    try:
        getattr(entry, "check_args", check_common)(checked)
    except UserError as e:  # ... and named as the flag the user gave
        raise UserError(str(e).replace("--output_dir", "--job_dir")) from None
    # What depends on the job's process count (each rank's seed, the effective lr): the job refused it at start.
    check_world(args, args.nodes * tasks)


def submit(
    module_name: str,
    description: str,
    argv: Sequence[str] | None = None,
    make_executor: Callable[..., submitit.Executor] = submitit.AutoExecutor,
) -> None:
    """Parse the entry point's flags plus the launcher's (``argv``, default the command line), check
    them as the job will, and submit the job through ``make_executor`` (submitit's by default)."""
    entry = importlib.import_module(module_name)
    args = parse_args(entry, description, argv)
    check_flags(entry, args)
    executor = make_executor(folder=args.job_dir, cluster=args.cluster, slurm_max_num_timeout=30)
    request_resources(executor, args, module_name)
    args.output_dir = args.job_dir
    job = executor.submit(Trainer(module_name, args))
    print(f"submitted job {job.job_id}; logs and checkpoints in {args.job_dir.replace('%j', str(job.job_id))}")
    if os.environ.get("MAE_SUBMITIT_WAIT"):
        job.result()


def parse_args(entry: ModuleType, description: str, argv: Sequence[str] | None) -> argparse.Namespace:
    """The entry point's flags and the launcher's, as the job's nodes will take them."""
    parser = entry.get_args_parser()
    parser.description = f"submitit launcher for {description}"
    add_launcher_args(parser)
    # --device's and --num_workers' defaults depend on the machine: the job's nodes, not this one, decide them. The
    # cores of the machine that submits (a login node's 2 or 4) were the job's data-loading workers per task.
    parser.set_defaults(device=None, num_workers=None)
    # ... and --help says so: the entry point's help gives this machine's device.
    parser._option_string_actions["--device"].help = "cuda if --ngpus is above 0, else cpu"
    args = parser.parse_args(argv)
    # submitit expands a leading ~ in the folder it writes the job's logs to, and a shell leaves one unexpanded
    # after '=' (--job_dir=~/jobs/%j): the checkpoints went to ./~/jobs/<id>, the logs to the home folder.
    args.job_dir = os.path.expanduser(args.job_dir)
    if args.device is None:
        args.device = "cuda" if args.ngpus > 0 else "cpu"
    return args


def request_resources(executor: submitit.Executor, args: argparse.Namespace, name: str) -> None:
    """The job's nodes, tasks, GPUs, CPUs, memory, time and SLURM options, as ``executor``'s parameters."""
    # srun is told each task's CPUs again: from Slurm 22.05 (its release notes; 23.11 reads them again) srun no
    # longer takes sbatch's --cpus-per-task, so each task asked for one CPU, which a cluster that binds tasks
    # to their CPUs made the only one of its process and its data loader's workers.
    srun_args = [f"--cpus-per-task={CPUS_PER_TASK}"]
    slurm = {"slurm_partition": args.partition, "slurm_signal_delay_s": 120, "slurm_srun_args": srun_args}
    if args.comment:
        slurm["slurm_comment"] = args.comment
    if args.use_volta32:
        slurm["slurm_constraint"] = "volta32gb"
    executor.update_parameters(
        mem_gb=40 * max(args.ngpus, 1),
        gpus_per_node=args.ngpus,
        tasks_per_node=tasks_per_node(args),
        cpus_per_task=CPUS_PER_TASK,
        nodes=args.nodes,
        timeout_min=args.timeout,
        name=name,
        **slurm,
    )
