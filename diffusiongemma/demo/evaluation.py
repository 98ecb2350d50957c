"""The demo model's answer evaluation: the questions of `evaluation_set.json` asked as a user would ask them
(`diffusiongemma generate QUESTION --seed 0`: the shipped weights and generation settings, seed 0 before each
question), each answer scored against what the training data says about the object.

- module: the answer names the object's module ("... is in the `os.path` module.", or "... is a built-in.");
- signature: the answer is exactly the expected "Call it as `...`.";
- purpose: word overlap (F1) of the answer with the docstring's first sentence;
- small talk: the answer is exactly the expected one.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from pathlib import Path

EVALUATION_SET = Path(__file__).parent / "evaluation_set.json"
SEED = 0


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def word_f1(answer: str, expected: str) -> float:
    """Bag-of-words F1 of the answer against the expected text."""
    said, wanted = Counter(words(answer)), Counter(words(expected))
    common = sum((said & wanted).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(said.values()), common / sum(wanted.values())
    return 2 * precision * recall / (precision + recall)


def score(item: dict, answer: str) -> float:
    """1.0 or 0.0 for a module, signature or small-talk question; the word F1 for a purpose question."""
    kind, expected = item["kind"], item["answer"]
    if kind == "purpose":
        return word_f1(answer, expected)
    if kind == "module":
        return float(expected.split(" is ", 1)[1] in answer)
    return float(answer.strip() == expected)


def ask(model, processor, question: str) -> dict:
    """One question asked as `diffusiongemma generate QUESTION --seed 0` asks it."""
    import torch

    from ..hf.streamers import StepCounter

    ids = processor.apply_chat_template([{"role": "user", "content": question}], tokenize=True,
                                        add_generation_prompt=True, return_tensors="pt")
    torch.manual_seed(SEED)
    counter = StepCounter()
    out = model.generate(ids, streamer=counter)
    generated = out.sequences[0, ids.shape[1]:]
    ends = set(model.generation_config.eos_token_id)
    return {"answer": processor.decode(generated, skip_special_tokens=True).strip(),
            "ended": any(int(token) in ends for token in generated),
            "tokens_per_forward": float(out.tokens_per_forward[0]), "steps": counter.steps}


def summarize(items: list[dict], results: list[dict]) -> dict:
    """The figures the model card quotes, from each question's result."""
    def mean_score(split: str, kind: str) -> float | None:
        scores = [score(item, result["answer"]) for item, result in zip(items, results)
                  if item["split"] == split and item["kind"] == kind]
        return statistics.mean(scores) if scores else None

    steps = [count for result in results for count in result["steps"]]
    figures = {f"{split}_{kind}": mean_score(split, kind)
               for split in ("trained", "heldout") for kind in ("module", "signature", "purpose")}
    figures["small_talk"] = mean_score("small_talk", "small_talk")
    figures.update(questions=len(items),
                   ended_with_end_of_turn=statistics.mean(float(r["ended"]) for r in results),
                   tokens_per_forward=statistics.mean(r["tokens_per_forward"] for r in results),
                   steps_per_canvas=statistics.mean(steps))
    return figures


def evaluate_answers(model, processor, items: list[dict] | None = None) -> tuple[dict, list[dict]]:
    """(figures, each question's result) of a loaded model on `items` (default: the whole evaluation set)."""
    items = load_evaluation_set() if items is None else items
    results = [ask(model, processor, item["question"]) for item in items]
    return summarize(items, results), results


def load_evaluation_set() -> list[dict]:
    return json.loads(EVALUATION_SET.read_text())
