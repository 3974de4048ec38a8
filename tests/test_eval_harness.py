"""The lm-eval-harness model `ferrum-jax` against lm-eval's own `hf` model on the same HF
directory, over a local offline task set (`eval_tasks.py`: multiple choice, generation with
`until` stops, rolling loglikelihood): same accuracy, loglikelihoods within 1e-3, identical
generations; its loglikelihoods are `fj.score`'s; its tokenizer fields and chat template
equal `HFLM`'s; `ferrum-jax eval` runs the same tasks from the command line.

The fast tests run a tiny random Llama with SmolLM2's tokenizer; the slow one SmolLM2
itself, exported to an HF directory from its GGUF.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import numpy as np
import pytest
import safetensors.numpy
from conftest import require_reference
from eval_tasks import write_tasks

import ferrum_jax as fj
from ferrum_jax.checkpoint import hf_state_dict, read_tokenizer, save_tokenizer
from ferrum_jax.checkpoint.hf_config import write_config
from ferrum_jax.cli import main

# Nothing here may reach the network: the tasks are local files, the models local folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

LOGLIKELIHOOD_TOL = 1e-3
WALL: dict[str, float] = {}
"""Wall time of each `simple_evaluate` run, printed at the end of the module."""


def require_lm_eval():
    """Imports lm_eval (the `eval` extra, in `dev`); under CI=true its absence fails."""
    try:
        import lm_eval
        import lm_eval.tasks
    except ImportError as e:  # pragma: no cover - exercised only on broken installs
        if os.environ.get("CI") == "true":
            pytest.fail(f"the lm-eval tests need lm-eval under CI: {e}")
        pytest.skip(f"lm-eval not installed: {e}")
    require_reference()
    import ferrum_jax.eval_harness

    return lm_eval, ferrum_jax.eval_harness


def export_hf(model: fj.Model, root: pathlib.Path) -> pathlib.Path:
    """An HF directory (safetensors, config.json, tokenizer files) holding `model`."""
    root.mkdir(parents=True)
    state = {
        k: np.ascontiguousarray(v) for k, v in hf_state_dict(model.config, model.params).items()
    }
    safetensors.numpy.save_file(state, root / "model.safetensors")
    write_config(model.config, root)
    save_tokenizer(model.tokenizer, root)
    return root


@pytest.fixture(scope="module", autouse=True)
def _report(one_torch_thread):
    yield
    if WALL:
        print("\nsimple_evaluate wall time:")
        for key, value in WALL.items():
            print(f"  {key}: {value:.1f} s")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template, as an HF directory."""
    tokenizer = read_tokenizer()
    config = fj.ModelConfig.from_hf(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": tokenizer.vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
    )
    model = fj.Model.init(config, seed=0, tokenizer=tokenizer)
    return export_hf(model, tmp_path_factory.mktemp("tiny-eval") / "hf")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> tuple[pathlib.Path, list[str]]:
    # "e" is in almost every word: the random model's outputs do meet a stop string.
    root = tmp_path_factory.mktemp("tasks")
    return root, write_tasks(root, until=["\n", "e"], max_gen_toks=12)


def evaluate(name: str, model: str, path: pathlib.Path, tasks, **kwargs) -> dict:
    lm_eval, _ = require_lm_eval()
    root, names = tasks
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=model,
        model_args=f"pretrained={path},dtype=float32",
        tasks=names,
        task_manager=lm_eval.tasks.TaskManager(include_path=str(root)),
        device="cpu",
        batch_size=8,
        log_samples=True,
        **kwargs,
    )
    WALL[f"{name} {model}"] = time.perf_counter() - start
    return out


@pytest.fixture(scope="module")
def tiny_runs(tiny_dir, tasks) -> dict[str, dict]:
    return {m: evaluate("tiny", m, tiny_dir, tasks) for m in ("hf", "ferrum-jax")}


def compare(runs: dict[str, dict], names: list[str]) -> None:
    """Same metrics; per sample: loglikelihoods within tolerance, equal greedy flags,
    identical generated texts."""
    ours, theirs = runs["ferrum-jax"], runs["hf"]
    for task in names:
        a, b = ours["results"][task], theirs["results"][task]
        for metric in ("acc,none", "exact_match,none"):
            if metric in b:
                assert a[metric] == b[metric], (task, metric)
        if "word_perplexity,none" in b:
            np.testing.assert_allclose(a["word_perplexity,none"], b["word_perplexity,none"], 1e-3)
        samples_a, samples_b = ours["samples"][task], theirs["samples"][task]
        assert len(samples_a) == len(samples_b) > 0
        for x, y in zip(samples_a, samples_b, strict=True):
            assert x["doc_id"] == y["doc_id"]
            for got, want in zip(x["resps"], y["resps"], strict=True):
                (got,), (want,) = got, want
                if isinstance(want, str):
                    assert got == want, (task, x["doc_id"])
                elif isinstance(want, tuple | list):  # (loglikelihood, is_greedy)
                    assert abs(got[0] - want[0]) <= LOGLIKELIHOOD_TOL, (task, got, want)
                    assert bool(got[1]) == bool(want[1]), (task, got, want)
                else:  # a rolling loglikelihood
                    assert abs(got - want) <= LOGLIKELIHOOD_TOL, (task, got, want)


def test_registered_under_its_name():
    _, harness = require_lm_eval()
    from lm_eval.api.registry import get_model

    assert get_model("ferrum-jax") is harness.FerrumJaxLM


def test_simple_evaluate_equals_hf(tiny_runs, tasks):
    compare(tiny_runs, tasks[1])
    texts = [s["resps"][0][0] for s in tiny_runs["ferrum-jax"]["samples"]["fj_gen"]]
    assert not any("e" in t or "\n" in t for t in texts)  # cut before the stops
    assert sum(bool(t) for t in texts) >= 3, texts


def test_loglikelihoods_are_fj_score(tiny_dir):
    """`loglikelihood` is `fj.score` on the tokens lm-eval's rules give (HFLM's encoding of
    context and continuation), including a greedy continuation."""
    _, harness = require_lm_eval()
    from lm_eval.api.instance import Instance

    lm = harness.FerrumJaxLM(pretrained=str(tiny_dir), batch_size=2)
    model = lm.model
    context = "Question: what do bees make?\nAnswer:"
    ids = lm.tok_encode(context)
    logits = np.asarray(fj.forward(model.graphdef, model.params, np.asarray([ids])))[0, -1]
    greedy = lm.tok_decode([int(logits.argmax())])
    pairs = [(context, " honey"), (context, " milk and silk"), ("", "Bees"), (context, greedy)]
    requests = [
        Instance("loglikelihood", {}, pair, i, ("fj_test", i, 1)) for i, pair in enumerate(pairs)
    ]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    for (ctx, cont), (logprob, is_greedy) in zip(pairs, got, strict=True):
        if ctx:
            ctx_ids, cont_ids = lm._encode_pair(ctx, cont)
        else:  # an empty context is conditioned on the prefix token (BOS, else EOS)
            ctx_ids, cont_ids = [lm.prefix_token_id], lm.tok_encode(cont)
        (want,) = fj.score(model.graphdef, model.params, [ctx_ids], [cont_ids])
        assert abs(logprob - want.logprob) <= 1e-5 and is_greedy == want.is_greedy
    assert got[3][1] is True and not got[0][1]

    rolling = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, ("bees make honey " * 40,), 0)], disable_tqdm=True
    )
    (want,) = fj.rolling_loglikelihood(
        model.graphdef,
        model.params,
        [lm.tok_encode("bees make honey " * 40)],
        prefix_token=lm.prefix_token_id,
        max_length=lm.max_length,
    )
    assert abs(rolling[0] - want.logprob) <= 1e-4


def test_tokenizer_fields_and_chat_template_equal_hflm(tiny_dir):
    _, harness = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    ours = harness.FerrumJaxLM.create_from_arg_string(
        f"pretrained={tiny_dir},dtype=float32,max_length=128,trust_remote_code=True",
        {"batch_size": "auto", "max_batch_size": 4, "device": "cpu"},
    )
    theirs = HFLM(pretrained=str(tiny_dir), device="cpu", batch_size=1, max_length=128)
    for field in ("eot_token_id", "prefix_token_id", "max_length", "tokenizer_name"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.max_gen_toks == theirs.max_gen_toks == 256
    assert ours.batch_size == "auto" and ours.device == "cpu"
    assert ours.chat_template(True) == theirs.chat_template(True)
    assert ours.chat_template(False) is None
    for text in ["Hello world", "  two spaces", "<|im_start|>user\nhi", "数字 123"]:
        assert ours.tok_encode(text) == theirs.tok_encode(text), text
        assert ours._encode_pair("Q: " + text, " A") == theirs._encode_pair("Q: " + text, " A")
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What colour is the sky?"},
        {"role": "assistant", "content": "The sky is"},
    ]
    for messages, prompt in [(history[:2], True), (history, False), (history[1:2], True)]:
        got = ours.apply_chat_template(messages, add_generation_prompt=prompt)
        assert got == theirs.apply_chat_template(messages, add_generation_prompt=prompt)
    assert ours.get_model_info()["model_num_parameters"] > 0


def test_pretrained_takes_a_hub_name(tiny_dir, tmp_path, monkeypatch):
    """`pretrained=org/name` (and lm-eval's default `revision=main`) loads from the hub
    cache, offline."""
    _, harness = require_lm_eval()
    from hub_layout import add_snapshot

    cache = tmp_path / "hub"
    snapshot = add_snapshot(
        cache, "org/tiny-eval", {p.name: p for p in tiny_dir.iterdir()}, commit="c" * 40
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    lm = harness.FerrumJaxLM.create_from_arg_string("pretrained=org/tiny-eval,revision=main")
    assert lm.model.source == str(snapshot) and lm.tokenizer_name == "org__tiny-eval"


def test_model_args_are_checked(tiny_dir):
    _, harness = require_lm_eval()
    with pytest.raises(fj.FerrumError, match="unknown model_args for ferrum-jax: colour"):
        harness.FerrumJaxLM.create_from_arg_string(f"pretrained={tiny_dir},colour=blue")
    with pytest.raises(fj.FerrumError, match="exceeds the model's context of 256"):
        harness.FerrumJaxLM(pretrained=str(tiny_dir), max_length=1000)
    with pytest.raises(fj.FerrumError, match="batch_size must be an integer >= 1"):
        harness.FerrumJaxLM(pretrained=str(tiny_dir), batch_size="many")


def test_ferrum_jax_eval_command(tiny_dir, tasks, tiny_runs, tmp_path, capsys):
    root, _ = tasks
    argv = [
        "eval",
        "--model_args",
        f"pretrained={tiny_dir}",
        "--tasks",
        "fj_mc,fj_gen",
        "--include_path",
        str(root),
        "--batch_size",
        "8",
        "--device",
        "cpu",
        "--output_path",
        str(tmp_path / "results"),
    ]
    start = time.perf_counter()
    assert main(argv) == 0
    WALL["tiny ferrum-jax eval (fj_mc, fj_gen)"] = time.perf_counter() - start
    out = capsys.readouterr().out
    assert "ferrum-jax" in out and "fj_mc" in out  # lm-eval's results table
    (path,) = (tmp_path / "results").rglob("results_*.json")
    results = json.loads(path.read_text())["results"]
    want = tiny_runs["hf"]["results"]
    assert results["fj_mc"]["acc,none"] == want["fj_mc"]["acc,none"]
    assert results["fj_gen"]["exact_match,none"] == want["fj_gen"]["exact_match,none"]


def test_eval_errors_are_one_line(tasks, capsys):
    require_lm_eval()
    root, _ = tasks
    argv = ["eval", "--model_args", "pretrained=/nonexistent", "--tasks", "fj_mc"]
    assert main([*argv, "--include_path", str(root)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "ferrum-jax: error: /nonexistent: no such file or directory"


@pytest.mark.slow
def test_smollm2_from_gguf_equals_hf(tmp_path_factory):
    """SmolLM2-135M-Instruct, its GGUF exported to an HF directory (fp32), through both
    models: same accuracy, loglikelihoods within 1e-3, identical generations."""
    require_lm_eval()
    model = fj.load_model()
    path = export_hf(model, tmp_path_factory.mktemp("smollm2") / "hf")
    del model
    root = tmp_path_factory.mktemp("smollm2-tasks")
    names = write_tasks(root, until=["\n", "."], max_gen_toks=16)
    runs = {m: evaluate("SmolLM2", m, path, (root, names)) for m in ("hf", "ferrum-jax")}
    compare(runs, names)
    texts = [s["resps"][0][0] for s in runs["ferrum-jax"]["samples"]["fj_gen"]]
    assert not any("." in t or "\n" in t for t in texts), texts
    assert sum(bool(t) for t in texts) >= 4, texts  # "def add(a, b):" stops at once, on "\n"


GOOD = {"until": ["\n"], "max_gen_toks": 4}


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ({"do_sample": True, "temperature": "hot"}, "gen_kwargs temperature must be a number"),
        ({"do_sample": True, "temperature": 1.0, "top_p": "x"}, "gen_kwargs top_p must be"),
        ({"max_gen_toks": 1.5}, "gen_kwargs max_gen_toks must be an integer"),
        ({"max_gen_toks": True}, "gen_kwargs max_gen_toks must be an integer"),
        ({"do_sample": "yes"}, "gen_kwargs do_sample must be true or false"),
        ({"until": 5}, "gen_kwargs until must be a string or a list"),
        ({"temperature": -1.0}, "temperature must be finite and >= 0"),
        ({"do_sample": True, "temperature": 1.0, "top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"min_p": float("nan")}, "min_p must be in [0, 1]"),
        ({"seed": -3}, "seed"),
        ({"top_k": 1099511627776}, "top_k"),
        ({"top_k": 1.5}, "top_k must be an integer"),
        ({"seed": "x"}, "seed"),
        (("Q:",), "args must be (context, gen_kwargs)"),
        ((5, dict(GOOD)), "the context must be a string"),
        (("Q:", "until=x"), "gen_kwargs must be a dict"),
    ],
)
def test_generate_until_bad_kwargs_are_one_error_naming_the_request(tiny_dir, bad, named):
    """Each used to be a bare ValueError/TypeError, an overflow at the first sampled step,
    or (top_k 2**40) accepted; now one FerrumError naming the request and the key, before
    any executor is built."""
    _, harness = require_lm_eval()
    from lm_eval.api.instance import Instance

    lm = harness.FerrumJaxLM(pretrained=str(tiny_dir), batch_size=2)
    args = ("Q: ho\nA:", {**GOOD, **bad}) if isinstance(bad, dict) else bad
    requests = [
        Instance("generate_until", {}, ("Q: hi\nA:", dict(GOOD)), 0),
        Instance("generate_until", {}, args, 1),
    ]
    with pytest.raises(fj.FerrumError) as e:
        lm.generate_until(requests, disable_tqdm=True)
    assert e.value.kind in (fj.ErrorKind.INVALID_PARAMETER, fj.ErrorKind.REQUEST_VALIDATION)
    assert e.value.message.startswith("generate_until request 1: "), e.value.message
    assert named in e.value.message, e.value.message


def test_top_p_zero_is_greedy_as_in_transformers(tiny_dir):
    """transformers' TopPLogitsWarper accepts top_p=0 and keeps only the most likely token,
    so HFLM decodes greedily; it used to become top_p=1.0 here (full sampling)."""
    _, harness = require_lm_eval()
    from lm_eval.api.instance import Instance

    lm = harness.FerrumJaxLM(pretrained=str(tiny_dir), batch_size=2)
    sampled = {**GOOD, "max_gen_toks": 8, "do_sample": True, "temperature": 1.5}
    request = lm._generation_request(0, ("Q: hi\nA:", {**sampled, "top_p": 0.0}))
    assert (request.temperature, request.top_k, request.top_p) == (0.0, 0, 1.0)
    # do_sample without a temperature samples at transformers' default of 1.0.
    sample = {**GOOD, "do_sample": True}
    assert lm._generation_request(0, ("Q:", sample)).temperature == 1.0
    assert lm._generation_request(0, ("Q:", {**sample, "top_p": 0.5})).top_p == 0.5
    prompts = [("Q: hi\nA:", {**sampled, "top_p": 0.0}), ("Q: hi\nA:", {**GOOD, "max_gen_toks": 8})]
    top_p_zero, greedy = lm.generate_until(
        [Instance("generate_until", {}, args, i) for i, args in enumerate(prompts)],
        disable_tqdm=True,
    )
    assert top_p_zero == greedy


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("", ""), "loglikelihood request 1: the continuation is empty"),
        (("Question:", ""), "loglikelihood request 1: the continuation is empty"),
        ((5, " x"), "loglikelihood request 1: args must be (context, continuation) strings"),
        (("only one",), "loglikelihood request 1: args must be"),
    ],
)
def test_loglikelihood_bad_pairs_are_one_error_naming_the_request(tiny_dir, args, named):
    """("", "") used to raise IndexError inside lm-eval's tokenization."""
    _, harness = require_lm_eval()
    from lm_eval.api.instance import Instance

    lm = harness.FerrumJaxLM(pretrained=str(tiny_dir), batch_size=2)
    requests = [
        Instance("loglikelihood", {}, ("Q:", " A"), 0),
        Instance("loglikelihood", {}, args, 1),
    ]
    with pytest.raises(fj.FerrumError) as e:
        lm.loglikelihood(requests, disable_tqdm=True)
    assert e.value.kind is fj.ErrorKind.INVALID_PARAMETER
    assert e.value.message.startswith(named), e.value.message


@pytest.mark.parametrize("args", [(5,), ("a", "b")])
def test_loglikelihood_rolling_bad_args_are_one_error_naming_the_request(tiny_dir, args):
    _, harness = require_lm_eval()
    from lm_eval.api.instance import Instance

    lm = harness.FerrumJaxLM(pretrained=str(tiny_dir), batch_size=2)
    requests = [
        Instance("loglikelihood_rolling", {}, ("bees",), 0),
        Instance("loglikelihood_rolling", {}, args, 1),
    ]
    with pytest.raises(fj.FerrumError, match=r"loglikelihood_rolling request 1: args must be"):
        lm.loglikelihood_rolling(requests, disable_tqdm=True)
