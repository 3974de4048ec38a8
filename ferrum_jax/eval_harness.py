"""The lm-eval-harness model `ferrum-jax`, registered when this module is imported.

    import ferrum_jax.eval_harness  # registers "ferrum-jax" in lm-eval's model registry
    lm_eval.simple_evaluate(model="ferrum-jax", model_args="pretrained=PATH,dtype=float32",
                            tasks=[...], batch_size=8)

`ferrum-jax eval ...` imports it and hands over to lm-eval's own command line (lm-eval has
no plugin discovery). It follows lm-eval's `HFLM` wherever the results depend on it, so a
model scores the same through either: the same tokenization of contexts and continuations
(`TemplateLM`), the same left truncation to `max_length`, the same rolling windows, the same
stop handling and text post-processing for `generate_until`. What differs is how it runs:
loglikelihoods through `ferrum_jax.engine.score` (jitted, bucketed), generation through the
executor with continuous batching (`ferrum_jax.batch_generation`).

Needs the `eval` extra: `pip install 'ferrum-jax[eval]'`.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from ferrum_jax.batch_generation import GenerationRequest, check_request, generate_batch
from ferrum_jax.checkpoint.load import load_model
from ferrum_jax.engine.buckets import bucket
from ferrum_jax.engine.score import DEFAULT_MAX_TOKENS, rolling_windows, score
from ferrum_jax.errors import FerrumError
from ferrum_jax.executor import JaxModelExecutor
from ferrum_jax.sampling import SamplingParams

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "ferrum_jax.eval_harness needs lm-eval: pip install 'ferrum-jax[eval]'"
    ) from e

from tqdm import tqdm

log = logging.getLogger("ferrum_jax")

NAME = "ferrum-jax"
"""The model's name in lm-eval's registry (`--model ferrum-jax`)."""

DEFAULT_BATCH_SIZE = 8
"""Pairs per scoring step and sequences decoding at once, when lm-eval passes none."""
AUTO_BATCH_SIZE = 32
"""`batch_size=auto`: scoring steps are bounded by `max_tokens` anyway; generation runs
this many sequences (or `max_batch_size`)."""

_IGNORED = frozenset(
    {
        # Torch / accelerate / transformers settings with no meaning here.
        "trust_remote_code",
        "use_fast_tokenizer",
        "parallelize",
        "max_memory_per_gpu",
        "max_cpu_memory",
        "offload_folder",
        "logits_cache",
        "softmax_dtype",
        "mixed_precision_dtype",
        "backend",
        "subfolder",
        "attn_implementation",
        "low_cpu_mem_usage",
    }
)
"""lm-eval/HF model args accepted and ignored (logged): they tune torch, not results."""

_GEN_KWARGS = frozenset({"do_sample", "temperature", "top_k", "top_p", "min_p", "seed"})
"""Generation kwargs understood besides `until` and `max_gen_toks` (normalised by lm-eval)."""
_REAL_GEN_KWARGS = frozenset({"temperature", "top_p", "min_p"})
_INT_GEN_KWARGS = frozenset(
    {"max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"}
)
"""Numeric generation kwargs whose type is checked here, before lm-eval's
`normalize_gen_kwargs` and `SamplingParams.make` convert them with `float()`/`int()` (a bare
ValueError on `"hot"`, or 1.5 truncated to 1). `top_k` and `seed` are integers by
`SamplingParams.make` and `check_request` themselves."""
_NEUTRAL_GEN_KWARGS = {"num_beams": 1, "repetition_penalty": 1.0, "use_cache": True}
"""Generation kwargs accepted at the value that changes nothing."""

_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
"""transformers' marker for `continue_final_message` (cut after rendering)."""


def _bool(value: Any, name: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise FerrumError.invalid_parameter(f"{name} must be true or false, got {value!r}")


def _int(value: Any, name: str, *, minimum: int = 1) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, bool) or number != float(value) or number < minimum:
        raise FerrumError.invalid_parameter(
            f"{name} must be an integer >= {minimum}, got {value!r}"
        )
    return number


def _check_gen_types(gen_kwargs: dict[str, Any]) -> None:
    """Numbers where lm-eval and the sampler expect them (bools are not numbers here),
    `do_sample` a bool, `until` a string or a list of strings."""
    for name, value in gen_kwargs.items():
        if name in _REAL_GEN_KWARGS:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            what = "a number"
        elif name in _INT_GEN_KWARGS:
            ok = isinstance(value, int) and not isinstance(value, bool)
            what = "an integer"
        elif name == "do_sample":
            ok, what = isinstance(value, bool), "true or false"
        elif name == "until":
            ok = isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(s, str) for s in value)
            )
            what = "a string or a list of strings"
        else:
            continue  # the neutral and unknown kwargs are named after normalising
        if not ok:
            raise FerrumError.invalid_parameter(
                f"gen_kwargs {name} must be {what}, got {type(value).__name__} {value!r}"
            )


@register_model(NAME)
class FerrumJaxLM(TemplateLM):
    """lm-eval model over a ferrum-jax `Model` (HF directory, `.gguf`, orbax, or `org/name`)."""

    def __init__(
        self,
        pretrained: str | None = None,
        dtype: str = "float32",
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        device: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        revision: str | None = None,
        gguf_file: str | None = None,
        truncation: bool = False,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        seed: int = 1234,
        chat_template_args: dict[str, Any] | None = None,
        enable_thinking: bool | None = None,
        **kwargs: Any,
    ) -> None:
        """`pretrained` is anything `load_model` takes (None: the embedded SmolLM2); the rest
        are lm-eval's usual model args. `max_tokens` bounds the tokens of one scoring step;
        `seed` seeds sampled generations (request i draws with `seed + i`)."""
        super().__init__()
        unknown = sorted(set(kwargs) - _IGNORED)
        if unknown:
            raise FerrumError.invalid_parameter(
                f"unknown model_args for {NAME}: {', '.join(unknown)}"
            )
        if kwargs:
            log.info("%s ignores torch-only model_args: %s", NAME, ", ".join(sorted(kwargs)))
        if revision == "main":  # lm-eval's default for every model: the hub's default branch
            revision = None
        if revision is not None and pretrained is not None and os.path.exists(str(pretrained)):
            revision = None  # a local path has no revisions (HFLM ignores it there too)
        self._batch_size = self._parse_batch_size(batch_size)
        self._max_batch_size = _int(max_batch_size, "max_batch_size")
        self._device_name = device
        self.model = load_model(pretrained, dtype=dtype, revision=revision, gguf_file=gguf_file)
        if self.model.tokenizer is None:
            raise FerrumError.tokenizer(
                f"{self.model.source} ships no tokenizer; lm-eval needs one"
            )
        self.tokenizer = self.model.tokenizer
        self.pretrained = pretrained
        self.revision = revision
        self.dtype = dtype
        context = self.model.config.max_position_embeddings
        self._max_length = _int(max_length, "max_length") or context
        if self._max_length > context:
            raise FerrumError.invalid_parameter(
                f"max_length {self._max_length} exceeds the model's context of {context}"
            )
        self._max_gen_toks = _int(max_gen_toks, "max_gen_toks")
        self.add_bos_token = _bool(add_bos_token, "add_bos_token")
        self.custom_prefix_token_id = _int(prefix_token_id, "prefix_token_id", minimum=0)
        self.truncation = _bool(truncation, "truncation")
        self.max_tokens = _int(max_tokens, "max_tokens")
        self.seed = _int(seed, "seed", minimum=0)
        self.chat_template_args = dict(chat_template_args or {})
        if enable_thinking is not None:
            self.chat_template_args["enable_thinking"] = _bool(enable_thinking, "enable_thinking")
        if self.tokenizer.eos_token_ids == ():
            raise FerrumError.tokenizer(f"{self.model.source}: the tokenizer names no EOS token")
        self.vocab_size = self.model.config.vocab_size

    @staticmethod
    def _parse_batch_size(value: int | str | None) -> int | str:
        if value is None:
            return DEFAULT_BATCH_SIZE
        if isinstance(value, str) and value.startswith("auto"):
            return "auto"
        return _int(value, "batch_size")

    # ---- what lm-eval reads --------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_ids[0]

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context (and each rolling text) is conditioned on: BOS, else
        EOS, as in `HFLM`."""
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int | str:
        return self._batch_size

    @property
    def device(self) -> str:
        import jax

        return self._device_name or jax.default_backend()

    @property
    def tokenizer_name(self) -> str:
        return str(self.pretrained or pathlib.Path(self.model.source).name).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        return self.tokenizer.chat_template

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """As `HFLM`: the tokenizer's template; without a generation prompt the last message
        is continued (transformers' `continue_final_message`)."""
        messages = [dict(m) for m in chat_history]
        try:
            return self._render(messages, add_generation_prompt)
        except FerrumError:
            # HFLM retries without the system message: some templates refuse that role.
            messages = [m for m in messages if m.get("role") != "system"]
            return self._render(messages, add_generation_prompt)

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        if add_generation_prompt or not messages:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, **self.chat_template_args
            )
        final = str(messages[-1].get("content", ""))
        messages[-1] = {**messages[-1], "content": final + _CONTINUE_TAG}
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=False, **self.chat_template_args
        )
        at = text.rfind(_CONTINUE_TAG.strip())
        if at < 0:
            raise FerrumError.tokenizer(
                "the chat template drops the final message; cannot continue it"
            )
        if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            return text[:at]
        return text[:at].rstrip()

    def get_model_info(self) -> dict[str, Any]:
        return {
            "model_num_parameters": self.model.config.num_params,
            "model_dtype": self.dtype,
            "model_revision": self.revision or "",
            "model_source": self.model.source,
            "model_format": self.model.format,
        }

    # ---- tokenization (HFLM's rules) -----------------------------------------------------------

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """As `HFLM.tok_encode`: special tokens as the tokenizer adds them (or as
        `add_bos_token` says), none for a string that already starts with the prefix token."""
        special = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        if add_special_tokens is None and string.startswith(
            self.tokenizer.decode([self.prefix_token_id])
        ):
            special = False
        ids = self._encode(string, special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _prompt_encode(self, string: str) -> list[int]:
        """As `HFLM.tok_batch_encode` (generation prompts): no special tokens when the text
        starts with BOS."""
        bos = self.tokenizer.special_tokens.get("bos_token")
        special = False if bos and string.startswith(bos) else self.add_bos_token
        return self._encode(string, special)

    def _encode(self, string: str, special: bool | None) -> list[int]:
        ids = self.tokenizer.encode(string, add_special_tokens=special is not False)
        bos = self.tokenizer.bos_token_id
        # add_bos_token=True makes transformers add BOS even where the tokenizer would not.
        if special is True and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # ---- loglikelihood -------------------------------------------------------------------------

    def _rows_per_step(self) -> int:
        return 1 << 30 if self._batch_size == "auto" else int(self._batch_size)

    def _score_pairs(
        self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool, desc: str
    ) -> list[tuple[float, bool]]:
        """Scores `(context, continuation)` token pairs, truncated on the left to
        `max_length + 1` tokens as `HFLM` does; `batch_size` pairs per step, longest first."""
        contexts, continuations = [], []
        for i, (context, continuation) in enumerate(pairs):
            if not continuation:
                raise FerrumError.invalid_parameter(
                    f"loglikelihood pair {i}: the continuation encodes to no tokens"
                )
            if len(continuation) > self.max_length:
                raise FerrumError.invalid_parameter(
                    f"loglikelihood pair {i}: a continuation of {len(continuation)} tokens "
                    f"exceeds max_length {self.max_length}"
                )
            whole = (context + continuation)[-(self.max_length + 1) :]
            contexts.append(whole[: len(whole) - len(continuation)])
            continuations.append(continuation)
        order = sorted(range(len(pairs)), key=lambda i: -(len(contexts[i]) + len(continuations[i])))
        rows = self._rows_per_step()
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        bar = tqdm(total=len(pairs), desc=desc, disable=disable_tqdm)
        for start in range(0, len(order), rows):
            chunk = order[start : start + rows]
            scores = score(
                self.model.graphdef,
                self.model.params,
                [contexts[i] for i in chunk],
                [continuations[i] for i in chunk],
                max_tokens=self.max_tokens,
            )
            for i, s in zip(chunk, scores, strict=True):
                out[i] = (s.logprob, s.is_greedy)
            bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]

    def loglikelihood(
        self, requests: list[Any], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """As `TemplateLM.loglikelihood`, once every request is checked: two strings, the
        continuation not empty (lm-eval's own code fails on an empty one with an IndexError
        or scores nothing)."""
        for i, request in enumerate(requests):
            args = getattr(request, "args", None)
            if not (
                isinstance(args, tuple) and len(args) == 2 and all(isinstance(a, str) for a in args)
            ):
                raise FerrumError.invalid_parameter(
                    f"loglikelihood request {i}: args must be (context, continuation) strings, "
                    f"got {args!r}"
                )
            if not args[1]:
                raise FerrumError.invalid_parameter(
                    f"loglikelihood request {i}: the continuation is empty (context "
                    f"{args[0][:40]!r}); there is nothing to score"
                )
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        answers = self._score_pairs(
            [(list(ctx), list(cont)) for _, ctx, cont in requests],
            disable_tqdm,
            "Running loglikelihood requests",
        )
        for (key, _, _), answer in zip(requests, answers, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihoods over `max_length` windows (each token scored once)."""
        windows, owner = [], []
        for i, request in enumerate(requests):
            args = getattr(request, "args", None)
            if not (isinstance(args, tuple) and len(args) == 1 and isinstance(args[0], str)):
                raise FerrumError.invalid_parameter(
                    f"loglikelihood_rolling request {i}: args must be (text,), got {args!r}"
                )
            (text,) = args
            for pair in rolling_windows(
                self.tok_encode(text), prefix_token=self.prefix_token_id, max_length=self.max_length
            ):
                windows.append(pair)
                owner.append(i)
        scores = self._score_pairs(windows, disable_tqdm, "Running loglikelihood_rolling requests")
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores, strict=True):
            totals[i] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---- generation ----------------------------------------------------------------------------

    def _generation_request(self, index: int, args: Any) -> GenerationRequest:
        """The request for `generate_until` request `index` (`args`: its `(context,
        gen_kwargs)`); every bad argument is one `FerrumError` naming the request and the
        key, before anything runs."""
        try:
            if not (isinstance(args, tuple) and len(args) == 2):
                raise FerrumError.invalid_parameter(
                    f"args must be (context, gen_kwargs), got {args!r}"
                )
            return self._checked_request(index, *args)
        except FerrumError as e:
            raise type(e)(e.kind, f"generate_until request {index}: {e.message}") from None

    def _checked_request(self, index: int, context: str, gen_kwargs: dict) -> GenerationRequest:
        if not isinstance(context, str):
            raise FerrumError.invalid_parameter(f"the context must be a string, got {context!r}")
        if not isinstance(gen_kwargs, dict):
            raise FerrumError.invalid_parameter(f"gen_kwargs must be a dict, got {gen_kwargs!r}")
        # None means "not given", as lm-eval's own max-token aliases read it.
        gen_kwargs = {k: v for k, v in gen_kwargs.items() if v is not None}
        _check_gen_types(gen_kwargs)
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_gen = _int(kwargs.pop("max_gen_toks"), "max_gen_toks")
        for name, neutral in _NEUTRAL_GEN_KWARGS.items():
            if name in kwargs and kwargs.pop(name) != neutral:
                raise FerrumError.unsupported(
                    f"generation kwarg {name}={gen_kwargs[name]!r} (only {neutral!r} is supported)"
                )
        unknown = sorted(set(kwargs) - _GEN_KWARGS)
        if unknown:
            raise FerrumError.unsupported(f"generation kwargs {', '.join(unknown)}")
        temperature = kwargs.get("temperature", 1.0)  # transformers' default, as HFLM samples
        top_p = kwargs.get("top_p", 1.0)
        values = {
            "temperature": temperature,
            "top_k": kwargs.get("top_k", 0),
            # transformers' TopPLogitsWarper accepts top_p=0 (it refuses only < 0 and > 1)
            # and then keeps the single most likely token: HFLM generates greedily. Ours
            # takes (0, 1] (vLLM's range), so 0 is that greedy decoding, said explicitly.
            "top_p": 1.0 if top_p == 0 else top_p,
            "min_p": kwargs.get("min_p", 0.0),
        }
        # The ranges, in SamplingParams' own words, checked whether or not they are used.
        SamplingParams.make(1, **values)
        sampled = kwargs["do_sample"] and temperature > 0 and top_p != 0
        max_context = self.max_length - max_gen
        if max_context < 1:
            raise FerrumError.invalid_parameter(
                f"max_gen_toks {max_gen} leaves no room for a prompt in max_length "
                f"{self.max_length}"
            )
        # HFLM keeps the last `max_length - max_gen_toks` prompt tokens.
        prompt = self._prompt_encode(context)[-max_context:]
        greedy = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
        request = GenerationRequest(
            prompt_ids=prompt,
            max_new_tokens=max_gen,
            seed=kwargs.get("seed", self.seed + index),
            stop=tuple(s for s in until if s),
            stop_token_ids=self._stop_token_ids(),
            key=index,
            **(values if sampled else greedy),
        )
        check_request(request, vocab=self.vocab_size, max_sequence_length=self.max_length)
        return request

    def _stop_token_ids(self) -> tuple[int, ...]:
        """What ends generation in transformers: the tokenizer's EOS ids and the config's."""
        ids = [*self.tokenizer.eos_token_ids, *self.model.config.eos_token_ids]
        return tuple(dict.fromkeys(ids))

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation until a stop string, EOS or `max_gen_toks`, with the
        text `HFLM` returns: generated ids decoded without special tokens, cut before the
        first stop string."""
        if not requests:
            return []
        made = [self._generation_request(i, request.args) for i, request in enumerate(requests)]
        longest = max(len(r.prompt_ids) + r.max_new_tokens for r in made)
        # A power-of-two sequence length: another call with similar requests reuses the
        # executor's compiled programs.
        length = min(bucket(longest, minimum=64), self.model.config.max_position_embeddings)
        rows = (
            self._max_batch_size or AUTO_BATCH_SIZE
            if self._batch_size == "auto"
            else int(self._batch_size)
        )
        executor = JaxModelExecutor(
            self.model, max_batch_size=min(rows, len(made)), max_sequence_length=length
        )
        out: list[str | None] = [None] * len(made)
        bar = tqdm(total=len(made), desc="Running generate_until requests", disable=disable_tqdm)
        for result in generate_batch(executor, made, tokenizer=self.tokenizer):
            request = made[result.index]
            text = self.tok_decode(result.token_ids, skip_special_tokens=True)
            for stop in request.stop:
                text = text.split(stop)[0]
            out[result.index] = text
            self.cache_hook.add_partial("generate_until", requests[result.index].args, text)
            bar.update(1)
        bar.close()
        return out  # type: ignore[return-value]


def run_cli(argv: Sequence[str]) -> int:
    """`ferrum-jax eval ARGS`: lm-eval's own command line with `ferrum-jax` registered (this
    module is imported) and `--model ferrum-jax` unless ARGS name another model."""
    from lm_eval.__main__ import cli_evaluate

    args = list(argv)
    commands = {"run", "ls", "validate"}
    if not args or args[0] not in commands:
        args = ["run", *args]
    if args[0] == "run" and not any(
        a in ("--model", "-M") or a.startswith("--model=") for a in args
    ):
        args[1:1] = ["--model", NAME]
    saved = sys.argv
    sys.argv = ["ferrum-jax eval", *args]
    try:
        cli_evaluate()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0
