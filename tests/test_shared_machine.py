"""Shared machines: unstable timings say so instead of a ratio, every command takes `--threads`, and
records carry the thread count and load average."""

from __future__ import annotations

import click
import pytest
import torch
from click.testing import CliRunner

from semisparse.bench import UNSTABLE_SPREAD, Timing, markdown, ratio_cell, unstable_spread
from semisparse.cli import main
from semisparse.export import provenance
from semisparse.runtime import load_average, machine_state, set_threads


def test_spread_is_range_over_median() -> None:
    timing = Timing.of([1.0, 1.1, 0.9, 1.0, 1.2])
    assert timing.seconds == 1.0 and timing.spread == pytest.approx(0.3)
    # the 549x of a busy 2-core machine: most repeats stalled behind another process, one did not
    stalled = Timing.of([0.058, 32.1, 31.8, 33.0, 0.06])
    assert stalled.seconds == pytest.approx(31.8) and stalled.spread > 1
    with pytest.raises(ValueError):
        Timing.of([])


def test_unstable_cells_print_the_spread_not_the_ratio() -> None:
    assert ratio_cell(1.234, [0.1, 0.2]) == "**1.23×**"
    assert unstable_spread(0.1, UNSTABLE_SPREAD) is None
    assert unstable_spread(0.1, 2.4) == 2.4
    assert ratio_cell(266.3, [0.05, 2.4]) == "unstable (spread 240%)"
    assert ratio_cell(266.3, [2.4, 0.05]) == "unstable (spread 240%)"  # either side


def synthetic_record(dense: list[float], sparse: list[float]) -> dict[str, object]:
    """A `run_bench` record built from given repeat timings (seconds) of one layer and the e2e model."""
    d, s = Timing.of(dense), Timing.of(sparse)
    row = {
        "layer": "down_proj", "out": 256, "in": 512, "tokens": 16,
        "dense_ms": d.seconds * 1e3, "sparse_ms": s.seconds * 1e3, "speedup": d.seconds / s.seconds,
        "dense_spread": d.spread, "sparse_spread": s.spread,
    }  # fmt: skip
    side = {"prefill_tokens_per_s": 100.0, "decode_tokens_per_s": 10.0, "decode_spread": 0.1}
    return {
        "device": "CPU (test)", "torch": "x", "dtype": "float32", "mode": "reduced", "timing": "wall clock",
        "repeats": len(dense), "warmup": 1, "shapes_from": "reduced", "note": None,
        "threads": 2, "cpus": 2, "load_average_start": [2.5, 1.0, 0.5], "load_average_end": None,
        "layers": [row],
        "end_to_end": {
            "end_to_end_model": "m", "prefill_tokens": 8, "decode_tokens": 2,
            "acceleration": {"summary": "off"}, "max_abs_logit_diff": 0.0,
            "dense": {**side, "prefill_spread": 0.1}, "sparse_24": {**side, "prefill_spread": 3.0},
            "prefill_speedup": 1.0, "decode_speedup": 1.0,
        },
        "end_to_end_model": "m",
    }  # fmt: skip


def test_markdown_says_unstable_instead_of_a_ratio() -> None:
    noisy = markdown(
        synthetic_record([0.032, 0.032, 0.033, 0.00005, 0.031], [5.8e-5, 5.9e-5, 6e-5, 5.8e-5, 6e-5])
    )
    assert "unstable (spread" in noisy and "549" not in noisy and "**" not in noisy.split("| down_proj")[1]
    assert "| prefill tokens/s | 100.0 | 100.0 | unstable (spread 300%) |" in noisy
    assert "| decode tokens/s | 10.0 | 10.0 | 1.00× |" in noisy  # decode repeated fine
    assert "2 PyTorch threads on 2 CPUs; load average (1 / 5 / 15 min) 2.50 / 1.00 / 0.50" in noisy
    steady = markdown(synthetic_record([1e-3, 1.05e-3, 0.98e-3], [0.5e-3, 0.52e-3, 0.5e-3]))
    assert "**2.00×**" in steady and "unstable (spread" not in steady.split("Cells:")[0]


def test_old_records_without_spreads_still_render() -> None:
    record = synthetic_record([1e-3], [1e-3])
    for key in ("dense_spread", "sparse_spread"):
        del record["layers"][0][key]  # type: ignore[index]
    for key in ("threads", "cpus", "load_average_start", "load_average_end"):
        del record[key]
    assert "**1.00×**" in markdown(record)


def every_command() -> list[click.Command]:
    commands: list[click.Command] = []
    for name, command in main.commands.items():
        if isinstance(command, click.Group):
            context = click.Context(command)
            commands += [command.get_command(context, sub) for sub in command.list_commands(context)]
        else:
            commands.append(command)
        assert name
    return commands


def test_every_command_takes_threads() -> None:
    commands = every_command()
    assert len(commands) >= 12
    for command in commands:
        assert any("--threads" in p.opts for p in command.params), command.name


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_threads_are_set_before_the_command_runs(restore_threads) -> None:
    result = CliRunner().invoke(main, ["settings", "sparsegpt", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("value", ["0", "-2"])
def test_fewer_than_one_thread_is_a_one_line_error(value: str, restore_threads) -> None:
    result = CliRunner().invoke(main, ["prune", "no-such-model", "-o", "x", "--threads", value])
    assert result.exit_code == 2
    assert result.stderr == f"error: --threads must be at least 1, got {value}\n"


def test_thread_count_and_load_are_recorded(restore_threads) -> None:
    set_threads(1)
    meta = provenance(method="x")
    assert meta["threads"] == 1
    assert len(meta["load_average"]) == 3 and len(load_average()) == 3  # 1, 5 and 15 minutes
    state = machine_state()
    assert state["threads"] == 1 and state["cpus"] >= 1 and len(state["load_average"]) == 3
