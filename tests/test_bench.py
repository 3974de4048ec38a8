"""`ferrum-jax bench` on a tiny checkpoint: a well-formed JSON report and a PNG plot.

No timing is asserted: only that every figure is measured, finite and consistent.
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import tiny_hf_model

from ferrum_jax.cli import main

RESULT_KEYS = {
    "batch",
    "prefill_tok_s",
    "ttft_s",
    "decode_tok_s",
    "e2e_tok_s",
    "compile_s",
    "roofline_fraction",
    "hf_prefill_tok_s",
    "hf_decode_tok_s",
    "decode_ratio_vs_hf",
    "prefill_ratio_vs_hf",
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model("llama").save_pretrained(path, safe_serialization=True)
    return path


def test_bench_writes_json_and_plot(checkpoint, tmp_path, capsys):
    report_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["bench", "--model", str(checkpoint), "--batch", "1,2", "--prompt-len", "12"]
    argv += ["--new-tokens", "6", "--repeat", "2", "--compare", "hf"]
    code = main([*argv, "--json", str(report_path), "--plot", str(plot_path)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(report_path.read_text())
    assert {"model", "dtype", "device", "bandwidth_gbs", "results", "noisy"} <= set(report)
    assert report["dtype"] == "float32" and isinstance(report["noisy"], bool)
    assert report["bandwidth_gbs"] > 0
    assert [r["batch"] for r in report["results"]] == [1, 2]
    for row in report["results"]:
        assert set(row) >= RESULT_KEYS
        assert set(row["compile_s"]) == {"prefill", "decode", "generate"}
        for key in RESULT_KEYS - {"batch", "compile_s"}:
            assert math.isfinite(row[key]) and row[key] > 0, key
        assert row["decode_ratio_vs_hf"] == pytest.approx(
            row["decode_tok_s"] / row["hf_decode_tok_s"]
        )
        # Same weights, same prompts, greedy: the two implementations emit the same tokens.
        assert row["greedy_token_agreement_vs_hf"] == 1.0
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_without_hf_and_bad_arguments(checkpoint, tmp_path, capsys):
    report_path = tmp_path / "ours.json"
    argv = ["bench", "--model", str(checkpoint), "--batch", "1", "--prompt-len", "12"]
    assert main([*argv, "--new-tokens", "6", "--repeat", "1", "--json", str(report_path)]) == 0
    row = json.loads(report_path.read_text())["results"][0]
    assert row["hf_decode_tok_s"] is None and row["decode_ratio_vs_hf"] is None
    capsys.readouterr()
    assert main([*argv, "--batch", "0"]) != 0
    assert main([*argv, "--new-tokens", "1"]) != 0
    err = capsys.readouterr().err
    assert err.count("ferrum-jax: error:") == 2 and "Traceback" not in err
