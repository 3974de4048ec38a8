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
    assert report["attention"] == "xla"  # auto, on CPU
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


def test_plot_of_one_batch_size_shows_bars_and_the_roofline():
    """A line through one point draws nothing: one batch size gives labelled bars."""
    import matplotlib.pyplot as plt

    from ferrum_jax.bench import plot_figure

    row = {"batch": 1, "decode_tok_s": 31.6, "hf_decode_tok_s": 29.1, "roofline_fraction": 0.6}
    report = {"dtype": "float32", "device": "cpu", "bandwidth_gbs": 28.0, "results": [row]}
    fig = plot_figure(report)
    ax = fig.axes[0]
    heights = [bar.get_height() for bar in ax.patches]
    assert heights == pytest.approx([31.6, 29.1, 31.6 / 0.6])
    labels = [tick.get_text() for tick in ax.get_xticklabels()]
    assert labels == ["ferrum-jax", "HF transformers", "roofline (28 GB/s)"]
    assert [t.get_text() for t in ax.texts] == ["31.6", "29.1", "52.7"]  # values on the bars
    plt.close(fig)
    report["results"] = [row, {**row, "batch": 8, "decode_tok_s": 131.0}]
    fig = plot_figure(report)
    assert [line.get_label() for line in fig.axes[0].get_lines()] == [
        "ferrum-jax",
        "HF transformers",
        "roofline (28 GB/s)",
    ]
    plt.close(fig)


def test_bench_rows_per_prompt_length_and_max_context(checkpoint, tmp_path, capsys):
    report_path = tmp_path / "scaling.json"
    argv = ["bench", "--model", str(checkpoint), "--batch", "1", "--prompt-len", "12,20"]
    argv += ["--max-context", "64,128", "--new-tokens", "6", "--repeat", "1"]
    assert main([*argv, "--json", str(report_path)]) == 0, capsys.readouterr().err
    report = json.loads(report_path.read_text())
    got = [(r["batch"], r["prompt_len"], r["max_context"]) for r in report["results"]]
    assert got == [(1, 12, 64), (1, 12, 128), (1, 20, 64), (1, 20, 128)]
    assert report["prompt_lens"] == [12, 20] and report["max_contexts"] == [64, 128]
    for row in report["results"]:
        assert set(row) >= RESULT_KEYS and row["decode_tok_s"] > 0
    capsys.readouterr()
    assert main([*argv[:-4], "--max-context", "16", "--new-tokens", "6"]) == 2
    assert "--max-context 16 must hold the padded prompt" in capsys.readouterr().err


SERVE_KEYS = {"serve_tok_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s"}


def test_bench_serve_reports_both_paths(checkpoint, tmp_path, capsys):
    """`--serve`: the engine loop through `unified_decode` and the 0.6 split path over one
    request mix (Poisson arrivals here), each with the documented keys; same greedy tokens."""
    report_path = tmp_path / "serve.json"
    argv = ["bench", "--model", str(checkpoint), "--serve", "--requests", "6"]
    argv += ["--serve-prompts", "4,40", "--serve-outputs", "2,8", "--serve-batch", "4"]
    argv += ["--rate", "50", "--json", str(report_path)]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads(report_path.read_text())
    for path in ("unified", "split"):
        row = report[path]
        assert set(row) >= SERVE_KEYS, row
        assert all(math.isfinite(row[k]) and row[k] >= 0 for k in SERVE_KEYS)
        assert row["serve_tok_s"] > 0 and row["ttft_p50_s"] <= row["ttft_p99_s"]
        assert row["itl_p50_s"] <= row["itl_p99_s"]
        assert 6 * 2 <= row["output_tokens"] <= 6 * 8
    assert report["unified"]["output_tokens"] == report["split"]["output_tokens"]
    assert report["unified_vs_split"] > 0 and report["requests"] == 6 and report["rate"] == 50
    assert report["same_tokens"] is True
    capsys.readouterr()
    assert main([*argv[:6], "--serve-prompts", "40,4"]) == 2
    assert "--serve-prompts" in capsys.readouterr().err
    assert main([*argv[:6], "--serve-prompts", "4,100000"]) == 2
    assert "more than the model's context" in capsys.readouterr().err


def test_bench_serve_finishes_on_a_pool_smaller_than_the_mix(checkpoint, tmp_path, capsys):
    """`--max-kv-tokens` below what the mix holds at once: both loops defer and preempt under
    KV pressure (Ferrum main's reservation on the unified path) and still agree."""
    report_path = tmp_path / "serve.json"
    argv = ["bench", "--model", str(checkpoint), "--serve", "--requests", "8"]
    argv += ["--serve-prompts", "30,60", "--serve-outputs", "4,8", "--serve-batch", "4"]
    argv += ["--max-kv-tokens", "96", "--json", str(report_path)]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads(report_path.read_text())
    assert report["same_tokens"] is True and report["unified"]["output_tokens"] >= 8 * 4


def test_device_benchmark_smoke_run_reports_every_figure(tmp_path):
    """`benchmarks/device_bench.py --smoke` (what `device.sh` runs on a GPU, at a tiny size)
    writes every figure the device run records; `device.sh` parses."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).parents[1]
    assert subprocess.run(["bash", "-n", str(root / "benchmarks" / "device.sh")]).returncode == 0
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import device_bench
    finally:
        sys.path.remove(str(root / "benchmarks"))
    out = tmp_path / "device.json"
    assert device_bench.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["attention"] == "xla" and report["bf16_matmul_tflops"] > 0
    tiny = report["models"]["tiny"]
    assert [row["batch"] for row in tiny["decode"]] == list(device_bench.SMOKE.batches)
    for row in tiny["decode"]:
        assert row["decode_tok_s"] > 0 and row["mbu"] > 0
    assert tiny["hf_batch1"]["decode_tok_s"] > 0 and tiny["decode_ratio_vs_hf_batch1"] > 0
    assert tiny["prefill"]["mfu"] > 0
    assert tiny["prefill"]["tokens"] == device_bench.SMOKE.prefill_len
