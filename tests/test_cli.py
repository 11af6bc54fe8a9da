"""The command line: one list of subcommands; `--help` (top level and per command) imports no torch, transformers or
matplotlib; a command that runs still finds the model classes registered."""

import json
import subprocess
import sys
import textwrap

import pytest

from hybridzoo.cli import SUBCOMMANDS

HEAVY = ("torch", "transformers", "matplotlib", "peft")

# the `hybridzoo` console script does `from hybridzoo_cli import main; sys.exit(main())`
RUN_ENTRY_POINT = textwrap.dedent(
    """
    import contextlib, io, json, sys
    sys.argv = ["hybridzoo", *sys.argv[1:]]
    out = io.StringIO()
    from hybridzoo_cli import main
    with contextlib.redirect_stdout(out):
        try:
            code = main()
        except SystemExit as exit:
            code = exit.code
    registered = False
    if "transformers" in sys.modules:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        registered = "hybridzoo" in CONFIG_MAPPING
    print(json.dumps({"code": code, "out": out.getvalue(), "registered": registered,
                      "heavy": [name for name in HEAVY if name in sys.modules]}))
    """
)


def run_entry_point(*args: str) -> dict:
    script = f"HEAVY = {HEAVY!r}\n" + RUN_ENTRY_POINT
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [["--help"], ["push", "--help"]])
def test_help_imports_nothing_heavy(args):
    report = run_entry_point(*args)
    assert report["code"] == 0 and report["heavy"] == []
    if args == ["--help"]:
        assert all(name in report["out"] for name in SUBCOMMANDS)
    else:
        assert "--repo-id" in report["out"]


def test_a_command_that_runs_has_the_model_classes_registered():
    report = run_entry_point("zoo", "show", "transformer", "--size", "tiny")
    assert report["code"] == 0 and report["registered"]
    assert json.loads(report["out"])["block_types"] == ["attention"] * 8


def test_every_subcommand_declares_its_options():
    from hybridzoo.cli import build_parser

    for name in SUBCOMMANDS:
        parser = build_parser(name)
        with pytest.raises(SystemExit) as exit:
            parser.parse_args([name, "--help"])
        assert exit.value.code == 0
