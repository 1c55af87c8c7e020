"""`semisparse bench --reduced`: runs on CPU and writes well-formed JSON and Markdown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from semisparse.bench import PRESETS, REDUCED, group_shapes, run_bench
from semisparse.cli import main
from semisparse.errors import SemisparseError


def test_presets_have_the_real_unique_linear_shapes() -> None:
    assert PRESETS["llama2-7b"].linears() == {
        "q_proj/k_proj/v_proj/o_proj": (4096, 4096),
        "gate_proj/up_proj": (11008, 4096),
        "down_proj": (4096, 11008),
    }
    assert PRESETS["llama3-8b"].linears()["k_proj/v_proj"] == (1024, 4096)
    assert group_shapes([("a", (2, 4)), ("b", (2, 4)), ("a", (2, 4))]) == {"a/b": (2, 4)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU reduced mode")
def test_reduced_cli_writes_json_and_markdown(tmp_path: Path) -> None:
    out = tmp_path / "r" / "bench.json"
    args = ["bench", "--reduced", "--tokens", "1,8", "--prefill", "16", "--decode", "2", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["mode"] == "reduced" and record["dtype"] == "float32"
    assert record["note"].startswith("not a speed claim: no CUDA GPU")
    shapes = REDUCED.linears()
    assert [(r["layer"], r["tokens"]) for r in record["layers"]] == [(n, t) for n in shapes for t in (1, 8)]
    for row in record["layers"]:
        assert (row["out"], row["in"]) == shapes[row["layer"]]
        assert row["dense_ms"] > 0 and row["sparse_ms"] > 0 and row["speedup"] > 0
        assert row["max_abs_diff"] == 0.0  # both sides are the same dense-with-zeros matmul on CPU
    e2e = record["end_to_end"]
    assert e2e["prefill_tokens"] == 16 and e2e["decode_tokens"] == 2 and e2e["max_abs_logit_diff"] == 0.0
    assert e2e["acceleration"]["fallback"].startswith("2:4 acceleration off")
    assert e2e["dense"]["prefill_tokens_per_s"] > 0 and e2e["sparse_24"]["decode_tokens_per_s"] > 0
    markdown = out.with_suffix(".md").read_text()
    assert markdown.startswith("# 2:4 vs dense") and "not a speed claim" in markdown
    assert markdown.count("| q_proj/o_proj (256 × 256) |") == 1 and "| prefill tokens/s |" in markdown
    assert "not a speed claim" in result.output


def test_full_mode_without_gpu_and_bad_tokens_are_user_errors(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        with pytest.raises(SemisparseError, match="add `reduced`"):
            run_bench(preset="llama2-7b")
    result = CliRunner().invoke(
        main, ["bench", "--reduced", "--tokens", "1,x", "-o", str(tmp_path / "b.json")]
    )
    assert result.exit_code == 2 and result.output.startswith("error: --tokens")
    assert not (tmp_path / "b.json").exists()
