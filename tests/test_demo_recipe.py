"""The demo model's corpus builder (recipes/demo/build_corpus.py): questions answered from the objects
themselves, held-out objects kept out of training, and an initial model that loads."""

import importlib.util
import json
from pathlib import Path

import pytest

from diffusiongemma import AutoProcessor, DiffusionGemmaForBlockDiffusion

RECIPE = Path(__file__).parents[1] / "recipes" / "demo" / "build_corpus.py"


@pytest.fixture(scope="module")
def build_corpus():
    spec = importlib.util.spec_from_file_location("build_corpus", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summaries_are_first_sentences_without_signature_lines(build_corpus):
    def documented():
        """frob(a, b) -> int

        Combine two values into one. Further details follow here.

        More text."""

    def undocumented():
        pass

    assert build_corpus.summary(documented) == "Combine two values into one."
    assert build_corpus.summary(undocumented) is None


def test_the_corpus_keeps_held_out_objects_out_of_training(build_corpus, tmp_path):
    counts = build_corpus.build(tmp_path)
    chats = {name: [json.loads(line)["messages"] for line in (tmp_path / name).read_text().splitlines()]
             for name in ("train.jsonl", "heldout.jsonl")}
    assert len(chats["train.jsonl"]) == counts["train_chats"]
    assert len(chats["heldout.jsonl"]) == counts["heldout_chats"]

    def objects(name):
        return {m[0]["content"].split("`")[1] for m in chats[name] if "`" in m[0]["content"]}

    assert objects("heldout.jsonl") and not objects("heldout.jsonl") & objects("train.jsonl")
    assert build_corpus.SHOWCASE <= objects("train.jsonl")
    # Answers come from the object: its module, under the name it is imported by.
    answers = {m[1]["content"] for m in chats["train.jsonl"] if "`os.path.join`" in m[0]["content"]}
    assert "`join` is in the `os.path` module." in answers
    assert "`os.path.join` is a function." in answers
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "init")
    processor = AutoProcessor.from_pretrained(tmp_path / "init")
    assert model.config.text_config.vocab_size == len(processor.tokenizer) == build_corpus.VOCAB_SIZE
    assert model.generation_config.max_denoising_steps == build_corpus.SAMPLING["max_denoising_steps"]
