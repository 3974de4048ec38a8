"""A local, offline lm-eval task set: multiple choice, generation with `until` stops and
rolling loglikelihood, written as JSONL files plus task YAMLs into a directory."""

from __future__ import annotations

import json
import pathlib

MC_DOCS = [
    {
        "question": "What colour is the sky on a clear day?",
        "choices": ["blue", "green", "red"],
        "answer": 0,
    },
    {
        "question": "How many legs does a spider have?",
        "choices": ["six", "eight", "ten"],
        "answer": 1,
    },
    {
        "question": "Which planet is closest to the sun?",
        "choices": ["Venus", "Earth", "Mercury"],
        "answer": 2,
    },
    {"question": "What do bees make?", "choices": ["honey", "milk", "silk"], "answer": 0},
    {"question": "What is frozen water called?", "choices": ["steam", "ice", "fog"], "answer": 1},
    {"question": "Which animal barks?", "choices": ["cat", "cow", "dog"], "answer": 2},
    {"question": "What is two plus two?", "choices": [" four", " five", " three"], "answer": 0},
    {
        "question": "Where do fish live?",
        "choices": ["in trees", "in water", "in the sky"],
        "answer": 1,
    },
]

GEN_PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "List three fruits:",
    "def add(a, b):",
    "The quick brown fox",
    "Water boils at",
]

ROLLING_TEXTS = [
    "The history of the printing press begins in the fifteenth century.",
    "Bees make honey, and spiders spin silk from glands in their bodies. " * 3,
]


def write_tasks(root: pathlib.Path, *, until: list[str], max_gen_toks: int = 12) -> list[str]:
    """Writes the three tasks into `root` (an `include_path`); returns their names."""
    root.mkdir(parents=True, exist_ok=True)

    def jsonl(name: str, rows: list[dict]) -> str:
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    mc = jsonl("mc", MC_DOCS)
    gen = jsonl("gen", [{"prompt": p, "target": ""} for p in GEN_PROMPTS])
    rolling = jsonl("rolling", [{"text": t} for t in ROLLING_TEXTS])
    tasks = {
        "fj_mc": {
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": mc}},
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{answer}}",
            "metric_list": [{"metric": "acc"}],
        },
        "fj_gen": {
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": gen}},
            "test_split": "test",
            "output_type": "generate_until",
            "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{target}}",
            "generation_kwargs": {"until": until, "max_gen_toks": max_gen_toks, "do_sample": False},
            "metric_list": [{"metric": "exact_match"}],
        },
        "fj_rolling": {
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": rolling}},
            "test_split": "test",
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [{"metric": "word_perplexity"}],
        },
    }
    for name, config in tasks.items():
        # JSON is valid YAML: no YAML writer needed.
        (root / f"{name}.yaml").write_text(json.dumps({"task": name, **config}, indent=1))
    return list(tasks)
