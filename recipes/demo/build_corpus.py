"""Builds the demo model's chat corpus and tokenizer offline, from what the running Python installation holds.

Every question is about one object of the standard library (a module-level function or class, or a
method of a built-in type) and is answered from the object itself: the first sentence of its docstring,
the module it lives in, its call signature, or what kind of object it is. Objects, not questions, are
split between training and held-out, so that held-out questions are about objects the model never saw.

    python recipes/demo/build_corpus.py OUT_FOLDER

writes OUT_FOLDER/train.jsonl, OUT_FOLDER/heldout.jsonl (one {"messages": [...]} chat per line),
OUT_FOLDER/train_more.jsonl (the training chats and module questions about made-up names, for the later
phases), OUT_FOLDER/evaluation_set.json (the questions `finish.py` scores the model on) and
OUT_FOLDER/init/: the untrained demo model (freshly initialized weights, config, generation config)
with a tokenizer trained on the training chats and the chat template. `train.yaml` trains it, then
`train_more.yaml` and `train_last.yaml`.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import importlib
import inspect
import io
import json
import pkgutil
import random
import re
import sys
import warnings
from pathlib import Path

from diffusiongemma import DiffusionGemmaForBlockDiffusion
from diffusiongemma.engine.generate import DiffusionGemmaGenerationConfig
from diffusiongemma.hf.chat_fixture import write_tokenizer
from diffusiongemma.model.config import (
    FULL,
    SLIDING,
    DiffusionGemmaConfig,
    DiffusionGemmaTextConfig,
)
from diffusiongemma.training.trainer import initialize_weights

# Modules that open windows or browsers, print on import, or are test suites and tools rather than API.
SKIPPED = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc_data", "lib2to3", "test",
           "ensurepip", "venv", "idle", "sre_compile", "sre_constants", "sre_parse", "msilib", "winreg", "winsound",
           "nturl2path", "xxlimited", "xxsubtype", "ntpath", "builtins"}
BUILTIN_TYPES = (str, bytes, bytearray, list, dict, set, frozenset, tuple, int, float, complex, range, memoryview)
ADDRESS = re.compile(r" at 0x[0-9a-f]+")
SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)\s*(->.*)?$")
MAX_ANSWER_CHARS = 160
HELDOUT_FRACTION = 0.04
# Objects the README and the model card ask about stay in training.
SHOWCASE = {"os.path.join", "str.split", "json.dumps", "len", "math.sqrt"}
# The evaluation asks about this many trained objects (the showcase ones among them) and every held-out one.
EVALUATED_TRAINED = 100
EVALUATED_KINDS = ("purpose", "module", "signature")
# Small talk is a few dozen chats among tens of thousands; repeated, the model sees it about as often as an
# object's answers and learns its exact wording.
SMALL_TALK_REPEATS = 16
# The later phases only: module questions about made-up names. Naming an object's module means copying the
# question's prefix; trained on real objects alone, the model copied names it had memorized and garbled
# about a quarter of the names it had never seen.
MADE_UP_CHATS = 8000
VOCAB_SIZE = 4096
# DiffusionGemma's architecture (sliding and full layers, dense MLP beside top-k experts) at about 4M
# parameters: small enough to train on two CPU cores in under two hours.
ARCHITECTURE = dict(hidden_size=192, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, num_global_key_value_heads=1, head_dim=48, global_head_dim=96,
                    num_experts=8, top_k_experts=2, moe_intermediate_size=96, vocab_size=VOCAB_SIZE,
                    sliding_window=64, max_position_embeddings=512, layer_types=[SLIDING, SLIDING, SLIDING, FULL])
CANVAS_LENGTH = 16
# A model this small is never as sure of itself as the release, whose settings (entropy bound 0.1, temperatures
# 0.8 to 0.4, mean entropy 0.005 to stop) would give nearly every canvas all its steps: cooler temperatures, a
# larger entropy bound and a looser stopping threshold let its canvases settle in a few steps.
SAMPLING = dict(max_new_tokens=64, max_denoising_steps=16, sampler_config={"entropy_bound": 0.5}, t_min=0.2,
                t_max=0.5, stability_threshold=1, confidence_threshold=0.05)

ASK_PURPOSE = ["What does `{q}` do?", "What is `{q}` for?", "Explain `{q}`.", "Describe `{q}` in one sentence.",
               "Tell me what `{q}` does."]
ASK_MODULE = ["Which module is `{q}` in?", "Which module does `{q}` belong to?", "Where is `{q}` defined?"]
ASK_SIGNATURE = ["What is the signature of `{q}`?", "How do I call `{q}`?", "What arguments does `{q}` take?"]
ASK_KIND = ["Is `{q}` a function or a class?", "What kind of object is `{q}`?"]
ASK = {"purpose": ASK_PURPOSE, "module": ASK_MODULE, "signature": ASK_SIGNATURE, "kind": ASK_KIND}
SMALL_TALK = [
    (["Hello", "Hi", "Hi!", "Hello!", "Hey", "Good morning", "Hello there"],
     "Hello! Ask me about Python's standard library, for example: What does `os.path.join` do?"),
    (["Who are you?", "What are you?", "What is your name?"],
     "I am a small DiffusionGemma demo model, trained on the docstrings of Python's standard library."),
    (["What can you do?", "How can you help me?", "What do you know?"],
     "I can tell you what a function or class of Python's standard library does, which module it is in and "
     "how to call it."),
    (["Thanks", "Thank you", "Thank you!", "Thanks a lot"], "You are welcome!"),
    (["Bye", "Goodbye", "See you"], "Goodbye!"),
]


def _quiet_import(name: str):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except BaseException:  # some modules exit or fail on platforms they do not support
            return None


def _modules():
    """(import name, module) for public standard-library modules and their public submodules."""
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIPPED:
            continue
        module = _quiet_import(name)
        if module is None:
            continue
        yield name, module
        if name == "os":  # `os.path` is a module under another name (posixpath); claim its objects first
            yield "os.path", module.path
        if name == "encodings":  # dozens of codec modules with the same few classes
            continue
        for info in pkgutil.iter_modules(getattr(module, "__path__", None) or []):
            if info.name.startswith("_") or info.name in SKIPPED or "test" in info.name:
                continue
            child = _quiet_import(f"{name}.{info.name}")
            if child is not None:
                yield f"{name}.{info.name}", child


def summary(obj) -> str | None:
    """The first sentence of the docstring's first paragraph, without a leading signature line."""
    doc = inspect.getdoc(obj)
    if not doc:
        return None
    lines = doc.strip().splitlines()
    while lines and SIGNATURE_LINE.match(lines[0].strip()):
        lines.pop(0)
    paragraph = []
    for line in lines:
        if not line.strip():
            if paragraph:
                break
            continue
        paragraph.append(line.strip())
    text = " ".join(paragraph)
    if not text or not text[0].isupper():
        return None
    sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    if len(sentence) > MAX_ANSWER_CHARS or len(sentence.split()) < 3 or not sentence.isprintable():
        return None
    return sentence if sentence.endswith((".", "!", "?")) else sentence + "."


def _signature(qualified: str, obj) -> str | None:
    try:
        signature = f"{qualified}{inspect.signature(obj)}"
    except (TypeError, ValueError):
        return None
    # A default that is a function or a bound method shows its memory address, which changes from run to run.
    return ADDRESS.sub("", signature)


def objects():
    """(qualified name, module name, object) for documented public functions, classes and built-in methods."""
    seen = set()
    for module_name, module in _modules():
        names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
        for name in sorted(set(names)):
            obj = getattr(module, name, None)
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                continue
            if getattr(obj, "__module__", None) not in (module.__name__, module_name):
                continue
            qualified = f"{module_name}.{name}"
            if id(obj) in seen or summary(obj) is None:
                continue
            seen.add(id(obj))
            yield qualified, module_name, obj
    for kind in BUILTIN_TYPES:
        for name, obj in sorted(vars(kind).items()):
            if not name.startswith("_") and callable(obj) and summary(obj) is not None:
                yield f"{kind.__name__}.{name}", "builtins", obj
    for name in sorted(vars(builtins)):
        obj = getattr(builtins, name)
        is_exception = inspect.isclass(obj) and issubclass(obj, BaseException)
        if not name.startswith("_") and (inspect.isbuiltin(obj) or inspect.isclass(obj)) and not is_exception \
                and summary(obj):
            yield name, "builtins", obj


def answers(qualified: str, module_name: str, obj) -> dict[str, str]:
    """What the model should say about an object, by kind of question."""
    short = qualified.rsplit(".", 1)[-1]
    said = {"purpose": summary(obj)}
    if module_name != "builtins":
        said["module"] = f"`{short}` is in the `{module_name}` module."
    elif "." not in qualified:
        said["module"] = f"`{short}` is a built-in."
    signature = _signature(qualified, obj)
    if signature is not None and len(signature) <= MAX_ANSWER_CHARS:
        said["signature"] = f"Call it as `{signature}`."
    kind = "a class" if inspect.isclass(obj) else "a function"
    if module_name == "builtins" and "." in qualified:
        kind = "a method"
    said["kind"] = f"`{qualified}` is {kind}."
    return said


def questions(qualified: str, said: dict[str, str], phrasings) -> list[tuple[str, str]]:
    """(question, answer) pairs; `phrasings` picks which of a kind's phrasings are asked."""
    return [(ask.format(q=qualified), said[kind]) for kind, asks in ASK.items() if kind in said
            for ask in phrasings(asks)]


def write_initial_model(folder: Path, texts: list[str], seed: int) -> None:
    special = write_tokenizer(folder, VOCAB_SIZE, texts=texts)
    eos = [special["eos_token"], special["end_of_turn_token"]]
    text = DiffusionGemmaTextConfig(**ARCHITECTURE, pad_token_id=special["pad_token"],
                                    bos_token_id=special["bos_token"], eos_token_id=eos)
    config = DiffusionGemmaConfig(text_config=text, vision_config=None, canvas_length=CANVAS_LENGTH,
                                  boi_token_id=special["boi_token"], eoi_token_id=special["eoi_token"],
                                  image_token_id=special["image_token"])
    model = DiffusionGemmaForBlockDiffusion(config)
    initialize_weights(model, seed)
    model.generation_config = DiffusionGemmaGenerationConfig(
        **SAMPLING, eos_token_id=eos, pad_token_id=special["pad_token"], bos_token_id=special["bos_token"])
    model.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)


def _chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def build(out: Path, seed: int = 0) -> dict[str, int]:
    rng = random.Random(seed)
    found = sorted(objects(), key=lambda item: item[0])
    candidates = [q for q, _, _ in found if q not in SHOWCASE]
    heldout_names = set(rng.sample(candidates, k=max(1, int(len(found) * HELDOUT_FRACTION))))
    said = {qualified: answers(qualified, module_name, obj) for qualified, module_name, obj in found}
    train, heldout = [], []
    for qualified, _, _ in found:
        if qualified in heldout_names:
            pairs = questions(qualified, said[qualified], lambda asks: [rng.choice(asks)])
            heldout.extend(_chat(q, a) for q, a in pairs)
        else:
            train.extend(_chat(q, a) for q, a in questions(qualified, said[qualified], lambda asks: asks))
    for asks, answer in SMALL_TALK:
        train.extend(_chat(ask, answer) for ask in asks for _ in range(SMALL_TALK_REPEATS))
    rng.shuffle(train)
    out.mkdir(parents=True, exist_ok=True)
    for name, chats in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        with open(out / name, "w", encoding="utf-8") as handle:
            for chat in chats:
                handle.write(json.dumps(chat, ensure_ascii=False) + "\n")
    trained_names = sorted(SHOWCASE) + rng.sample(sorted(set(said) - heldout_names - SHOWCASE),
                                                 k=EVALUATED_TRAINED - len(SHOWCASE))
    (out / "evaluation_set.json").write_text(json.dumps(
        evaluation_set(said, trained_names, sorted(heldout_names), rng), indent=1, ensure_ascii=False) + "\n")
    texts = [m["content"] for chat in train for m in chat["messages"]]
    write_initial_model(out / "init", texts, seed)
    # Its own generator, so that the first phase's files do not depend on it.
    more = train + made_up_chats([q for q, _, _ in found], MADE_UP_CHATS, random.Random(seed + 1))
    random.Random(seed + 1).shuffle(more)
    with open(out / "train_more.jsonl", "w", encoding="utf-8") as handle:
        for chat in more:
            handle.write(json.dumps(chat, ensure_ascii=False) + "\n")
    return {"objects": len(found), "train_chats": len(train), "heldout_chats": len(heldout),
            "made_up_chats": MADE_UP_CHATS}


def made_up_chats(real: list[str], count: int, rng: random.Random) -> list[dict]:
    """Module questions about names that are not objects of the standard library, built from the words of its
    real names: functions (snake_case) and classes (CamelCase) in real modules and in made-up ones."""
    words = sorted({w for q in real for w in re.findall(r"[a-z]{3,}", q.lower())})
    modules = sorted({q.rsplit(".", 1)[0] for q in real if "." in q and not q.split(".")[0][0].isupper()})
    taken, chats = set(real), []
    while len(chats) < count:
        parts = rng.sample(words, k=rng.randint(1, 3))
        name = "_".join(parts) if rng.random() < 0.6 else "".join(part.capitalize() for part in parts)
        module = rng.choice(modules) if rng.random() < 0.8 else ".".join(rng.sample(words, k=rng.randint(1, 2)))
        if f"{module}.{name}" in taken:
            continue
        taken.add(f"{module}.{name}")
        question = rng.choice(ASK_MODULE).format(q=f"{module}.{name}")
        chats.append(_chat(question, f"`{name}` is in the `{module}` module."))
    return chats


def evaluation_set(said: dict[str, dict[str, str]], trained: list[str], heldout: list[str],
                   rng: random.Random) -> list[dict]:
    """The questions `evaluate.py` asks, each in one of its kind's phrasings, with the answer to expect."""
    items = []
    for split, names in (("trained", trained), ("heldout", heldout)):
        for qualified in names:
            for kind in EVALUATED_KINDS:
                if kind in said[qualified]:
                    items.append({"split": split, "kind": kind, "object": qualified,
                                  "question": rng.choice(ASK[kind]).format(q=qualified),
                                  "answer": said[qualified][kind]})
    for asks, answer in SMALL_TALK:
        items.extend({"split": "small_talk", "kind": "small_talk", "object": None, "question": ask,
                      "answer": answer} for ask in asks)
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = {**build(args.out, args.seed), "python": sys.version.split()[0]}
    (args.out / "counts.json").write_text(json.dumps(counts) + "\n")
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
