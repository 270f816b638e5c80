"""The README documents every flag of every entry point, and its commands use real flags."""

import re
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import knn_eval  # noqa: E402
import main_finetune  # noqa: E402
import main_linprobe  # noqa: E402
import main_pretrain  # noqa: E402
from util.cli.launcher import add_launcher_args  # noqa: E402

README = (REPO / "README.md").read_text()
PARSERS = {
    "main_pretrain.py": main_pretrain,
    "main_finetune.py": main_finetune,
    "main_linprobe.py": main_linprobe,
    "knn_eval.py": knn_eval,
}


def _options(parser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_every_flag_is_documented(script):
    missing = sorted(o for o in _options(PARSERS[script].get_args_parser()) if f"`{o}`" not in README)
    assert not missing, f"README does not document {missing} of {script}"


def test_launcher_flags_are_documented():
    import argparse

    parser = argparse.ArgumentParser()
    add_launcher_args(parser)
    missing = sorted(o for o in _options(parser) if f"`{o}" not in README)
    assert not missing, missing


def _commands(text: str) -> list[list[str]]:
    """Shell commands in the README's code blocks that run one of our scripts."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0]
            for part in line.split("&&"):
                words = shlex.split(part)
                if any(w.endswith(tuple(PARSERS)) or w.startswith("submitit_") for w in words):
                    commands.append(words)
    return commands


def test_readme_commands_parse():
    commands = _commands(README)
    assert len(commands) >= 6  # guards the extraction itself
    for words in commands:
        script = next(w for w in words if w.endswith(tuple(PARSERS)) or w.startswith("submitit_"))
        name = script.replace("submitit_", "main_")
        flags = words[words.index(script) + 1 :]
        parser = PARSERS[name].get_args_parser()
        if script.startswith("submitit_"):
            add_launcher_args(parser)
        flags = [f for f in flags if f != "..."]
        try:
            parser.parse_args(flags)
        except SystemExit:
            pytest.fail(f"README command does not parse: {' '.join(words)}")
