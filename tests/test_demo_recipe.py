"""The demo model's corpus builder (recipes/demo/build_corpus.py): questions answered from the objects
themselves, held-out objects kept out of training, an evaluation set, and an initial model that loads."""

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
    # A trained object is asked about in every phrasing; a held-out one in one phrasing per kind of question.
    asked = {m[0]["content"] for m in chats["train.jsonl"] if "`os.path.join`" in m[0]["content"]}
    assert asked == {ask.format(q="os.path.join") for asks in build_corpus.ASK.values() for ask in asks}
    # The evaluation asks trained questions with their training answers, and about held-out objects only there.
    pairs = {(m[0]["content"], m[1]["content"]) for m in chats["train.jsonl"]}
    items = json.loads((tmp_path / "evaluation_set.json").read_text())
    splits = {split: [i for i in items if i["split"] == split] for split in ("trained", "heldout", "small_talk")}
    assert len({i["object"] for i in splits["trained"]}) == build_corpus.EVALUATED_TRAINED
    assert all((i["question"], i["answer"]) in pairs for i in splits["trained"] + splits["small_talk"])
    assert {i["object"] for i in splits["heldout"]} == objects("heldout.jsonl")
    # The second phase adds module questions about names that are no object of the library, held-out ones included.
    more = [json.loads(line)["messages"] for line in (tmp_path / "train_more.jsonl").read_text().splitlines()]
    first = {json.dumps(chat) for chat in chats["train.jsonl"]}
    made_up = [chat for chat in more if json.dumps(chat) not in first]
    assert len(more) == counts["train_chats"] + counts["made_up_chats"] and len(made_up) == counts["made_up_chats"]
    real = {q for q, _, _ in build_corpus.objects()}
    for chat in made_up:
        qualified = chat[0]["content"].split("`")[1]
        module, name = qualified.rsplit(".", 1)
        assert qualified not in real and chat[1]["content"] == f"`{name}` is in the `{module}` module."
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "init")
    processor = AutoProcessor.from_pretrained(tmp_path / "init")
    assert model.config.text_config.vocab_size == len(processor.tokenizer) == build_corpus.VOCAB_SIZE
    assert model.generation_config.max_denoising_steps == build_corpus.SAMPLING["max_denoising_steps"]


def test_each_training_phase_starts_where_the_one_before_ended(monkeypatch):
    import yaml

    from diffusiongemma.training.trainer import TrainingConfig

    monkeypatch.syspath_prepend(str(RECIPE.parent))
    spec = importlib.util.spec_from_file_location("finish", RECIPE.parent / "finish.py")
    finish = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finish)
    phases = [yaml.safe_load((RECIPE.parent / name).read_text()) for name in finish.PHASES]
    for phase in phases:
        TrainingConfig.from_dict(phase)
    assert phases[0]["model"] == "corpus/init"
    for before, after in zip(phases, phases[1:]):
        assert after["model"] == f"{before['output']}/final"
