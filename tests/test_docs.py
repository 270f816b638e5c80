"""The documentation (README.md and docs/*.md) documents every flag of every entry point, its
commands use real flags, every relative link and anchor resolves, and the demo split it ships
is what demo/make_split.py writes: disjoint, stratified and complete."""

import importlib.util
import os
import re
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "demo"))

import fault_campaign  # noqa: E402
import make_split  # noqa: E402

import dataset_stats  # noqa: E402
import export  # noqa: E402
import knn_eval  # noqa: E402
import main_finetune  # noqa: E402
import main_linprobe  # noqa: E402
import main_pretrain  # noqa: E402
import reconstruct  # noqa: E402
from util.cli.launcher import add_launcher_args  # noqa: E402
from util.data.datasets import classification_dataset  # noqa: E402

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
DOCS = "\n".join(page.read_text() for page in PAGES)
PARSERS = {
    "main_pretrain.py": main_pretrain,
    "main_finetune.py": main_finetune,
    "main_linprobe.py": main_linprobe,
    "knn_eval.py": knn_eval,
}
# The tools' commands in the docs must parse too (their flags are documented where they are used), and
# the scripts of the CPU study and of the fault campaign that the pages quote.
COMMANDS = {**PARSERS, "export.py": export, "reconstruct.py": reconstruct, "dataset_stats.py": dataset_stats}


def _script(path: str):
    """A recipe script as a module named after its path (recipes/cifar10_gpu has a results.py too)."""
    spec = importlib.util.spec_from_file_location(path.replace("/", "_").removesuffix(".py"), REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COMMANDS |= {path: _script(path) for path in (f"recipes/cifar10_cpu/{n}.py" for n in ("splits", "figures", "results"))}
COMMANDS["tests/fault_campaign.py"] = fault_campaign
COMMANDS["demo/make_split.py"] = make_split
README_MAX_LINES = 300


def _options(parser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_every_flag_is_documented(script):
    missing = sorted(o for o in _options(PARSERS[script].get_args_parser()) if f"`{o}`" not in DOCS)
    assert not missing, f"the docs do not document {missing} of {script}"


def test_launcher_flags_are_documented():
    import argparse

    parser = argparse.ArgumentParser()
    add_launcher_args(parser)
    missing = sorted(o for o in _options(parser) if f"`{o}" not in DOCS)
    assert not missing, missing


def test_flags_md_says_where_the_other_commands_flags_are():
    """docs/flags.md documents the flags of main_*.py; every other command of the checkout (a script that runs
    as __main__) is named there with the page that documents its flags, so a reader of flags.md finds them."""
    flags_md = (REPO / "docs" / "flags.md").read_text()
    scripts = sorted(p.name for p in REPO.glob("*.py") if 'if __name__ == "__main__"' in p.read_text())
    others = [name for name in scripts if not name.startswith("main_")]
    assert others, scripts  # the check below checks something
    named = {
        name
        for name in others
        if f"`{name}`" in flags_md or name.startswith("submitit_") and "`submitit_*.py`" in flags_md
    }
    assert sorted(set(others) - named) == []


# The official scripts' flags and defaults (facebookresearch/mae), facts compared, not code.
_OFFICIAL_SHARED = {
    "--batch_size": 64, "--epochs": 400, "--accum_iter": 1, "--model": "mae_vit_large_patch16",
    "--weight_decay": 0.05, "--lr": None, "--blr": 1e-3, "--min_lr": 0.0, "--warmup_epochs": 40,
    "--data_path": "/datasets01/imagenet_full_size/061417/", "--output_dir": "./output_dir",
    "--log_dir": "./output_dir", "--device": "cuda", "--seed": 0, "--resume": "", "--start_epoch": 0,
    "--num_workers": 10, "--pin_mem": True, "--no_pin_mem": True, "--world_size": 1, "--local_rank": -1,
    "--dist_on_itp": False, "--dist_url": "env://",
}  # fmt: skip
_OFFICIAL_CLASSIFIER = {
    "--model": "vit_large_patch16", "--finetune": "", "--nb_classes": 1000, "--eval": False, "--dist_eval": False,
}  # fmt: skip
OFFICIAL_FLAGS = {
    "main_pretrain.py": {**_OFFICIAL_SHARED, "--input_size": 224, "--mask_ratio": 0.75, "--norm_pix_loss": False},
    "main_finetune.py": {
        **_OFFICIAL_SHARED, **_OFFICIAL_CLASSIFIER, "--epochs": 50, "--min_lr": 1e-6, "--warmup_epochs": 5,
        "--input_size": 224, "--drop_path": 0.1, "--clip_grad": None, "--layer_decay": 0.75, "--color_jitter": None,
        "--aa": "rand-m9-mstd0.5-inc1", "--smoothing": 0.1, "--reprob": 0.25, "--remode": "pixel", "--recount": 1,
        "--resplit": False, "--mixup": 0, "--cutmix": 0, "--cutmix_minmax": None, "--mixup_prob": 1.0,
        "--mixup_switch_prob": 0.5, "--mixup_mode": "batch", "--global_pool": True, "--cls_token": True,
    },
    "main_linprobe.py": {
        **_OFFICIAL_SHARED, **_OFFICIAL_CLASSIFIER, "--batch_size": 512, "--epochs": 90, "--weight_decay": 0,
        "--blr": 0.1, "--warmup_epochs": 10, "--global_pool": False, "--cls_token": False,
    },
}  # fmt: skip


def test_checkpoints_md_names_the_flags_a_resume_takes_from_the_checkpoint():
    """docs/checkpoints.md says which flags left out a resume reads from the checkpoint (the entry points'
    FALLBACKS, and --mean/--std): every other one takes its default, which a new user did not expect."""
    text = " ".join((REPO / "docs" / "checkpoints.md").read_text().split())
    said = re.search(r"A resume reads only (.*?) from the checkpoint where they are not given", text)
    assert said, "docs/checkpoints.md no longer says which flags a resume takes from the checkpoint"
    taken = {*main_pretrain.FALLBACKS, *main_finetune.FALLBACKS, "mean", "std"}
    assert set(re.findall(r"`--(\w+)`", said.group(1))) == taken


def _flag_rows(flag: str) -> list[list[str]]:
    """The cells of docs/flags.md's table rows whose first cell names ``flag``."""
    rows = [line.split(" | ") for line in (REPO / "docs" / "flags.md").read_text().splitlines()]
    return [row for row in rows if len(row) >= 3 and f"`{flag}`" in row[0]]


@pytest.mark.parametrize("script", sorted(OFFICIAL_FLAGS))
def test_official_flags_keep_their_names_and_defaults_or_flags_md_marks_the_change(script):
    """flags.md: every official flag keeps its name, default and meaning, except where ★ marks a new
    default. Defaults that depend on the machine or a checkpoint are None or this machine's here."""
    parser = PARSERS[script].get_args_parser()
    actions = {o: a for a in parser._actions for o in a.option_strings}
    for flag, official in OFFICIAL_FLAGS[script].items():
        assert flag in actions, f"{script} lost the official flag {flag}"
        ours = parser.get_default(actions[flag].dest)
        if ours != official:
            rows = _flag_rows(flag)
            assert rows and all("★" in row[1] for row in rows), f"{script} {flag}: {ours!r}, officially {official!r}"


# docs/flags.md's sections and the entry points whose flags each lists ("Fine-tuning only:" opens a table
# inside the classifiers' section).
_FLAGS_MD_SECTIONS = {
    "Shared by all entry points": ("main_pretrain.py", "main_finetune.py", "main_linprobe.py"),
    "`main_pretrain.py`": ("main_pretrain.py",),
    "`main_finetune.py` and `main_linprobe.py`": ("main_finetune.py", "main_linprobe.py"),
    "Fine-tuning only:": ("main_finetune.py",),
}
# What a default cell says where the parser's default is None or empty: something else decides it.
_DECIDED_ELSEWHERE = ("none", "empty", "checkpoint's", "classifier's", "`--output_dir`")


def _flags_md_rows() -> list[tuple[tuple[str, ...], list[str], str]]:
    """(entry points, flags, default cell) of each table row of docs/flags.md."""
    rows, scripts = [], ()
    for line in (REPO / "docs" / "flags.md").read_text().splitlines():
        heading = line.removeprefix("## ")
        if heading in _FLAGS_MD_SECTIONS:
            scripts = _FLAGS_MD_SECTIONS[heading]
        elif line.startswith("## "):
            scripts = ()
        cells = line.split(" | ")
        if line.startswith("| `") and len(cells) >= 3:
            rows.append((scripts, re.findall(r"`(--[\w-]+)", cells[0]), cells[1]))
    return rows


def _says_default(cell: str, whole_cell: str, default, fallback) -> bool:
    """Whether a default cell of flags.md (one flag's part of it: ``cell``) states the parser's ``default``,
    or, where that is None or empty, says what decides it, naming the entry point's fallback if any."""
    if default is None or default == "":
        said = any(word in whole_cell for word in _DECIDED_ELSEWHERE)
        return said and (fallback is None or callable(fallback) or isinstance(fallback, bool)
                         or _says_default(whole_cell, whole_cell, fallback, None))  # fmt: skip
    if isinstance(default, bool):
        return ("off" if not default else "pinned") in cell
    if isinstance(default, str):
        return f"`{default}`" in cell
    numbers = {float(n) for n in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", cell)}
    return all(float(value) in numbers for value in (default if isinstance(default, list) else [default]))


@pytest.fixture
def machine_free_parsers(monkeypatch):
    """The entry points' parsers as on a machine without CUDA and with more cores than the default workers,
    where --device and --num_workers default to what flags.md says first."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # macOS, which has no sched_getaffinity
    return {name: module.get_args_parser() for name, module in PARSERS.items() if name.startswith("main_")}


def test_flags_md_lists_each_entry_points_flags_in_its_sections(machine_free_parsers):
    """Every flag of main_*.py is in a flags.md table that covers that entry point, and every flag of a table
    is one of each entry point the table covers: a flag documented under the wrong section is one a reader
    passes to a script that refuses it."""
    rows = _flags_md_rows()
    for name, parser in machine_free_parsers.items():
        listed = {flag for scripts, flags, _ in rows if name in scripts for flag in flags}
        assert sorted(_options(parser) - listed) == [], f"docs/flags.md does not list these flags of {name}"
        for scripts, flags, _ in rows:
            if name in scripts:
                assert set(flags) <= _options(parser), f"docs/flags.md lists {flags} for {name}, which lacks some"


def test_flags_md_states_each_flags_default(machine_free_parsers):
    """The default column of docs/flags.md holds each entry point's default of the row's flag (a row of
    several flags gives theirs in order, comma-separated); a default of None or empty is said to be decided
    elsewhere (the checkpoint, --output_dir) or to be none, and names the fallback a checkpoint-less run takes."""
    fallbacks = {"main_pretrain.py": main_pretrain.FALLBACKS, "main_finetune.py": main_finetune.FALLBACKS}
    fallbacks["main_linprobe.py"] = main_linprobe.FALLBACKS
    rows = _flags_md_rows()
    assert len(rows) > 40  # the rows were found
    for scripts, flags, cell in rows:
        for name in scripts:
            parser = machine_free_parsers[name]
            actions = list(dict.fromkeys(a for a in parser._actions for o in a.option_strings if o in flags))
            parts = cell.split(", ") if len(actions) > 1 and len(cell.split(", ")) == len(actions) else None
            for i, action in enumerate(actions):
                default, fallback = parser.get_default(action.dest), fallbacks[name].get(action.dest)
                part = parts[i] if parts else cell
                said = _says_default(part, cell, default, fallback)
                assert said, f"docs/flags.md: {action.option_strings[0]} of {name} defaults to {default!r}: {cell!r}"


def test_official_differences_lists_every_new_flag():
    """docs/official-differences.md's list of new flags names every flag of main_*.py that the official
    scripts lack (``--vis_*`` style patterns allowed), and nothing else; --local-rank is an alias."""
    import fnmatch

    text = " ".join((REPO / "docs" / "official-differences.md").read_text().split())
    said = re.search(r"New flags \(all marked ★ in \[Flags\]\(flags.md\)\): (.*?)(?= - |$)", text)
    assert said, "docs/official-differences.md no longer lists the new flags"
    patterns = set(re.findall(r"`(--[\w*]+)`", said.group(1)))
    new = {f for name, flags in OFFICIAL_FLAGS.items() for f in _options(PARSERS[name].get_args_parser()) - set(flags)}
    new -= {"--local-rank"}
    assert sorted(f for f in new if not any(fnmatch.fnmatch(f, p) for p in patterns)) == []
    assert sorted(p for p in patterns if not any(fnmatch.fnmatch(f, p) for f in new)) == []


def _commands(text: str) -> list[list[str]]:
    """Shell commands in the code blocks that run one of our scripts, and those quoted in the prose
    (an inline code span, which may break across a line)."""
    lines = "\n".join(re.findall(r"```bash\n(.*?)```", text, flags=re.S)).replace("\\\n", " ").splitlines()
    spans = re.findall(r"`([^`]+)`", _without_code_blocks(text))
    lines += [span.replace("\n", " ") for span in spans if re.match(r"\S*python3? \S+\.py", span)]
    commands = []
    for line in lines:
        line = line.split("#")[0]
        for part in line.split("&&"):
            words = shlex.split(part)
            if any(w.endswith(tuple(COMMANDS)) or w.startswith("submitit_") for w in words):
                commands.append(words)
    return commands


def _shell_scripts(text: str) -> list[list[str]]:
    """``bash recipes/...sh ARGS`` lines of the code blocks."""
    lines = "\n".join(re.findall(r"```bash\n(.*?)```", text, flags=re.S)).replace("\\\n", " ").splitlines()
    return [shlex.split(line.split("#")[0])[1:] for line in lines if line.startswith("bash recipes/")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_commands_parse(page):
    commands = _commands(page.read_text())
    for words in commands:
        script = next(w for w in words if w.endswith(tuple(COMMANDS)) or w.startswith("submitit_"))
        name = next(n for n in COMMANDS if script.replace("submitit_", "main_").endswith(n))
        flags = words[words.index(script) + 1 :]
        parser = COMMANDS[name].get_args_parser()
        if script.startswith("submitit_"):
            add_launcher_args(parser)
        flags = [f for f in flags if f != "..."]
        try:
            parser.parse_args(flags)
        except SystemExit:
            pytest.fail(f"{page.name}: command does not parse: {' '.join(words)}")


def test_commands_are_found():
    # Guards the extraction itself: the README's three commands and the recipes in docs/.
    assert len(_commands((REPO / "README.md").read_text())) >= 4
    assert len(_commands(DOCS)) >= 14
    tools = {w for words in _commands(DOCS) for w in words if w.endswith(("export.py", "reconstruct.py"))}
    assert tools == {"export.py", "reconstruct.py"}
    # The CPU study's scripts (docs/results.md) and the fault campaign's commands, one of them quoted in
    # the prose across a line break (docs/what-survives-what.md).
    quoted = [w for words in _commands(DOCS) for w in words if w.endswith(".py")]
    assert {f"recipes/cifar10_cpu/{name}.py" for name in ("splits", "figures", "results")} <= set(quoted)
    assert quoted.count("tests/fault_campaign.py") >= 2


def test_commands_parse_the_way_a_shell_reads_them():
    page = "```bash\npython main_pretrain.py --epochs 2 \\\n    --batch_size 8  # a comment\n```\n"
    page += "Run `python knn_eval.py\n--encoders random`, not `--epochs 2` alone.\n"
    assert _commands(page) == [
        ["python", "main_pretrain.py", "--epochs", "2", "--batch_size", "8"],
        ["python", "knn_eval.py", "--encoders", "random"],
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_documented_shell_scripts_exist_and_take_their_arguments(page):
    for script, *arguments in _shell_scripts(page.read_text()):
        assert (REPO / script).is_file(), f"{page.name}: no script {script}"
        usage = re.search(r"^# Usage: bash \S+ (.*)$", (REPO / script).read_text(), flags=re.M)
        if usage is None:  # the script takes no arguments
            assert not arguments, f"{page.name}: {script} takes no arguments, got {arguments}"
            continue
        words = usage.group(1).split("(")[0].split()  # what follows in parentheses is prose
        required = [word for word in words if not word.startswith("[")]
        assert len(arguments) >= len(required), f"{page.name}: {script} {arguments} lacks {required}"
        for word, argument in zip(required, arguments, strict=False):
            if "|" in word:  # a choice: mae|scratch
                assert argument in word.split("|"), f"{page.name}: {script}: {argument} is not one of {word}"


def _parsed(words: list[str]):
    """(script name, parsed flags) of a documented command of a training entry point, else None."""
    script = next(w for w in words if w.endswith(tuple(COMMANDS)) or w.startswith("submitit_"))
    name = next(n for n in COMMANDS if script.endswith(n))
    if script.startswith("submitit_") or name not in PARSERS or name == "knn_eval.py":
        return None
    flags = [f for f in words[words.index(script) + 1 :] if f != "..."]
    return name, PARSERS[name].get_args_parser().parse_args(flags)


CHECKPOINT_FLAGS = ("--finetune", "--resume", "--checkpoint", "--encoders")


def _checkpoints_read(words: list[str]) -> list[tuple[str, str]]:
    """(flag, path) of each ``<folder>/checkpoint-<epoch>.pth`` a command reads."""
    read = []
    for i, word in enumerate(words):
        if word in CHECKPOINT_FLAGS:
            for value in words[i + 1 :]:
                if value.startswith("--"):
                    break
                if re.fullmatch(r".+/checkpoint-\d+\.pth", value):
                    read.append((word, value))
                if word != "--encoders":  # the only one of them that takes several values
                    break
    return read


@pytest.mark.parametrize("page", [REPO / "README.md", REPO / "docs" / "own-data.md"], ids=lambda p: p.name)
def test_checkpoints_the_examples_read_are_written_before(page):
    """Pages whose examples run in order: a checkpoint an example reads from a folder is one that an
    earlier example writes there (its --output_dir, within its --epochs), and a --finetune
    checkpoint is not in the reading run's own --output_dir (which the run refuses)."""
    written: dict[str, int] = {}  # folder -> epochs of the run that writes it
    for words in _commands(page.read_text()):
        parsed = _parsed(words)
        for flag, path in _checkpoints_read(words):
            folder, name = os.path.split(os.path.normpath(path))
            epoch = int(re.search(r"\d+", name).group())
            assert epoch < written.get(folder, 0), f"{page.name}: no earlier example writes {path}: {' '.join(words)}"
            if flag == "--finetune" and parsed:
                own = os.path.normpath(parsed[1].output_dir)
                assert folder != own, f"{page.name}: --finetune {path} is in the run's own --output_dir {own}"
        if parsed:
            written[os.path.normpath(parsed[1].output_dir)] = parsed[1].epochs


@pytest.mark.parametrize("page", [REPO / "README.md", REPO / "docs" / "own-data.md"], ids=lambda p: p.name)
def test_the_examples_training_runs_each_write_their_own_output_dir(page):
    """Pages whose examples run in order: a training run that does not resume writes into a folder no
    earlier example trained in (the default ./output_dir too), since a used folder stops it at its
    start. The README's ViT-L pre-training, fine-tuning and probing all left --output_dir at its default:
    run in turn, the second stopped."""
    used: dict[str, str] = {}  # folder -> the command that trained there
    for words in _commands(page.read_text()):
        parsed = _parsed(words)
        if parsed is None or parsed[1].resume or getattr(parsed[1], "eval", False):
            continue
        folder = os.path.normpath(parsed[1].output_dir)
        assert folder not in used, f"{page.name}: {' '.join(words)} trains in {folder}, as {used[folder]} did"
        used[folder] = " ".join(words)


# ---------------------------------------------------------------------------------------------
# Links
# ---------------------------------------------------------------------------------------------
# Links


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, inline markup and punctuation dropped, spaces to '-'."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a Markdown page's headings (outside code blocks), with GitHub's -1, -2 for repeats."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.+)$", _without_code_blocks(text), flags=re.M):
        slug = _slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def _without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _prose(text: str) -> str:
    """The page without its code blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", _without_code_blocks(text))


def broken_links(page: Path) -> list[str]:
    """Every relative link or image of ``page`` whose file, or heading anchor, does not exist."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ...: not checked offline
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no file {path})")
        elif anchor and (file.suffix != ".md" or anchor not in anchors(file.read_text())):
            broken.append(f"{target} (no heading #{anchor} in {file.name})")
    return broken


# The pages outside docs/ that a reader is sent to: the benchmarks' and the GPU study's.
OTHER_PAGES = [REPO / "benchmarks" / "README.md", REPO / "recipes" / "cifar10_gpu" / "README.md"]


@pytest.mark.parametrize("page", [*PAGES, *OTHER_PAGES], ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve(page):
    assert not broken_links(page)


def test_cited_commits_are_in_the_history():
    """A commit the pages cite (where a figure was measured, what a campaign ran) is one of this branch's:
    what-survives-what.md cited c1c5078, a hash of a branch rebased since, which no checkout holds."""
    import subprocess

    def git(*words: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(REPO), *words], capture_output=True, text=True)

    if git("rev-parse", "--is-shallow-repository").stdout.strip() != "false":
        pytest.skip("needs a git checkout with its whole history")
    text = "\n".join(page.read_text() for page in [*PAGES, *OTHER_PAGES])
    cited = {h for h in re.findall(r"\b[0-9a-f]{7,40}\b", text) if re.search(r"\d", h) and re.search(r"[a-f]", h)}
    assert len(cited) >= 10, cited  # the pattern finds them
    missing = sorted(h for h in cited if git("merge-base", "--is-ancestor", h, "HEAD").returncode != 0)
    assert missing == [], f"cited commits that are not in this branch's history: {missing}"


def test_benchmark_commands_parse():
    """benchmarks/README.md's `python -m benchmarks.bench_pretrain` commands use the flags and choices the
    benchmark takes (its table names them too): a renamed flag left a documented command that stops at once."""
    from benchmarks import bench_pretrain

    text = (REPO / "benchmarks" / "README.md").read_text()
    lines = "\n".join(re.findall(r"```bash\n(.*?)```", text, flags=re.S)).replace("\\\n", " ").splitlines()
    commands = [shlex.split(line.split("#")[0]) for line in lines if "benchmarks.bench_pretrain" in line]
    assert len(commands) >= 8, commands  # the examples and the measured figures' command lines
    parser = bench_pretrain.get_args_parser()
    for words in commands:
        try:
            parser.parse_args(words[words.index("benchmarks.bench_pretrain") + 1 :])
        except SystemExit:
            pytest.fail(f"benchmarks/README.md: command does not parse: {' '.join(words)}")
    first_cells = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| `--")]
    table = {flag for cell in first_cells for flag in re.findall(r"`(--\w+)`", cell)}
    assert len(table) >= 15, table
    assert table <= _options(parser), sorted(table - _options(parser))


def test_link_check_finds_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Its `section`: one\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n[ok](#title) [ok](other.md#its-section-one) [ok](other.md) [web](https://example.org/x)\n"
        "[bad anchor](#nothing) [bad file](missing.md) [bad remote anchor](other.md#other)\n"
        "`[not a link](nowhere.md)`\n```bash\n[not a link](nowhere.md)\n```\n"
    )
    assert broken_links(page) == [
        "#nothing (no heading #nothing in page.md)",
        "missing.md (no file missing.md)",
        "other.md#other (no heading #other in other.md)",
    ]


def test_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= README_MAX_LINES


def _names_something(dotted: str) -> bool:
    """Whether ``dotted`` (util.x.y) is a module, or an attribute of the module it is in."""
    module, _, attr = dotted.rpartition(".")
    try:
        importlib.import_module(dotted)
        return True
    except ModuleNotFoundError:
        return hasattr(importlib.import_module(module), attr)


def test_architecture_section_names_what_exists():
    """Every util/ package is in the Architecture table, and every file, folder and dotted name the
    section mentions (the path of a step included) exists."""

    readme = (REPO / "README.md").read_text()
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    packages = sorted(p.parent.name for p in (REPO / "util").glob("*/__init__.py"))
    assert packages and all(f"`util/{name}/`" in section for name in packages), packages
    for path in re.findall(r"`((?:util/|tests/)?[\w/]+(?:\.py|/))`", section):
        assert (REPO / path).exists(), path
    for dotted in re.findall(r"`(util(?:\.\w+)+)", section):
        assert _names_something(dotted), dotted


def test_where_did_it_go_names_what_exists_and_is_called():
    """docs/official-differences.md's "Where did it go" table: every name of ours it gives exists, and every
    torch function it says a step calls is called by the tool's code (it named torch.nn.utils.get_total_norm
    for the official gradient norm, which nothing computes)."""

    text = (REPO / "docs" / "official-differences.md").read_text()
    table = text.split("| official | here |", 1)[1]
    here = "\n".join(row.split(" | ", 1)[1] for row in table.splitlines() if row.startswith("| `"))
    code = "\n".join(p.read_text() for p in [*REPO.glob("*.py"), *(REPO / "util").rglob("*.py")])
    for dotted in re.findall(r"\b(util(?:\.\w+)+)", here):
        assert _names_something(dotted), dotted
    called = re.findall(r"`(torch(?:\.\w+)+)", here)
    assert called, here  # the check below checks something
    for dotted in called:
        assert f"{dotted.rpartition('.')[2]}(" in code, f"{dotted}: no code of the tool calls it"


# ---------------------------------------------------------------------------------------------
# The demo split


def test_make_split_says_what_it_does_and_leaves_identical_files_untouched(tmp_path, capsys):
    """demo/make_split.py took no flags: --help rewrote the shipped files, and every run replaced them though
    they held what it writes (new files, new times, a checkout written for nothing)."""
    lists = tmp_path / "split"
    with pytest.raises(SystemExit) as stopped:
        make_split.main(["--help"], lists=str(lists))
    assert stopped.value.code == 0 and "train/val split of the demo images" in capsys.readouterr().out
    assert not lists.exists()
    make_split.main([], lists=str(lists))
    files = {p.name: p.stat() for p in lists.iterdir()}
    assert sorted(files) == ["train.txt", "val.txt"]
    make_split.main([], lists=str(lists))
    again = {p.name: p.stat() for p in lists.iterdir()}
    assert {n: (s.st_ino, s.st_mtime_ns) for n, s in again.items()} == {
        n: (s.st_ino, s.st_mtime_ns) for n, s in files.items()
    }
    assert capsys.readouterr().out.count("(unchanged)") == 2
    (lists / "val.txt").write_text("changed\n")
    make_split.main([], lists=str(lists))
    assert (lists / "val.txt").read_text() == "".join(
        f"{line}\n" for line in make_split.split_lines(lists=str(lists))["val"]
    )


def test_demo_split_is_shipped_disjoint_stratified_and_complete():
    lines = make_split.split_lines()
    shipped = {split: (REPO / "demo" / "cifar10-2k-split" / f"{split}.txt").read_text() for split in lines}
    assert shipped == {split: "".join(f"{line}\n" for line in lines[split]) for split in lines}

    classes = sorted(p.name for p in (REPO / "demo" / "cifar10-2k").iterdir())
    every = {
        (f"../cifar10-2k/{c}/{f.name}", i)
        for i, c in enumerate(classes)
        for f in (REPO / "demo" / "cifar10-2k" / c).glob("*.jpg")
    }
    parsed = {split: [tuple(line.rsplit(" ", 1)) for line in lines[split]] for split in lines}
    train, val = ({(path, int(label)) for path, label in parsed[s]} for s in ("train", "val"))
    assert not {p for p, _ in train} & {p for p, _ in val}
    assert train | val == every  # each image once, under its folder's class index
    for i in range(len(classes)):
        assert sum(label == i for _, label in train) == 160 and sum(label == i for _, label in val) == 40


def test_demo_split_is_a_classification_data_set():
    root = str(REPO / "demo" / "cifar10-2k-split")
    train = classification_dataset(root, "train", None, nb_classes=10)
    val = classification_dataset(root, "val", None, nb_classes=10)
    assert (len(train), len(val)) == (1600, 400)
    assert sorted(set(val.targets)) == list(range(10))


def _pins(path: Path, operator: str) -> dict[str, str]:
    """``name operator version`` lines of a requirements or constraints file (comments dropped)."""
    pins = {}
    for line in path.read_text().splitlines():
        spec = line.split("#")[0].strip()
        if operator in spec:
            name, version = spec.split(operator)
            pins[name.strip().lower()] = version.strip()
    return pins


def test_requirement_floors_are_the_releases_the_suite_ran_with():
    """requirements*.txt promise what constraints-floor.txt pinned when the whole suite passed:
    every pinned package's floor is its pinned release, and every runtime package is pinned."""
    floors = {**_pins(REPO / "requirements.txt", ">="), **_pins(REPO / "requirements-test.txt", ">=")}
    pinned = _pins(REPO / "constraints-floor.txt", "==")
    assert set(_pins(REPO / "requirements.txt", ">=")) <= set(pinned)
    for name, version in pinned.items():
        assert floors.get(name) == version, f"{name}: floor {floors.get(name)}, pinned {version}"
