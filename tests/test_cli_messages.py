"""The library names parameters in backquotes; the CLI shows each as the flag that sets it."""

import click
from click.testing import CliRunner

from semisparse.cli import main
from semisparse.cli.common import SETTINGS_KEY, cli_message


def _context() -> click.Context:
    command = click.Command(
        "demo",
        params=[
            click.Option(["--seqlen"], type=int),
            click.Option(["--max-windows"], type=int),
            click.Option(["-o", "--output", "out"]),
            click.Option(["--calibration", "source"]),
            click.Argument(["model"]),
        ],
    )
    context = click.Context(command)
    context.meta[SETTINGS_KEY] = ["percdamp"]
    return context


def test_cli_message_rewrites_parameters_into_flags() -> None:
    context = _context()
    # an option, by its parameter name (the longest flag wins, also for a renamed parameter)
    assert cli_message("use a smaller `seqlen`", context) == "use a smaller --seqlen"
    assert cli_message("drop `max_windows`", context) == "drop --max-windows"
    assert cli_message("choose another `out`", context) == "choose another --output"
    assert cli_message("check `source`", context) == "check --calibration"
    # the `=` form keeps the value glued to the flag
    assert cli_message("pass `seqlen`=256 or less", context) == "pass --seqlen=256 or less"
    # a method setting the command registered goes through --set
    assert cli_message("e.g. `percdamp`=0.1", context) == "e.g. --set percdamp=0.1"
    assert cli_message("raise `percdamp`", context) == "raise --set percdamp=..."
    # no flag for it here (an argument, or unknown): stays as the library wrote it
    assert cli_message("leave it out with `exclude`", context) == "leave it out with `exclude`"
    assert cli_message("give a `model`", context) == "give a `model`"
    assert cli_message("`semisparse quantize` output", context) == "`semisparse quantize` output"
    # outside a command the message is untouched
    assert cli_message("pass `seqlen`=256", None) == "pass `seqlen`=256"


def test_eval_names_its_own_flags(tmp_path, dense_dir, calib_file) -> None:
    report = tmp_path / "report"
    report.mkdir()
    result = CliRunner().invoke(
        main, ["eval", str(dense_dir), "--ppl", str(calib_file), "--report-dir", str(report)]
    )
    assert result.exit_code == 2
    assert "choose another --report-dir or pass --overwrite" in result.stderr
    result = CliRunner().invoke(main, ["eval", str(dense_dir), "--ppl", "none"])
    assert result.exit_code == 2 and "give --ppl=wikitext2 (or a text file) and/or --tasks" in result.stderr
