"""Turns a finished demo training run into the model that ships with the package, and measures it.

    python recipes/demo/finish.py CORPUS_FOLDER RUN_FOLDER --training-minutes M

copies RUN_FOLDER/final (the last phase's) into diffusiongemma/demo/model in bfloat16 with the recipe's
generation settings, copies the held-out chats and the evaluation set beside it, and writes the figures
the model card quotes to diffusiongemma/demo/model/evaluation.json: the answers to the evaluation set's
questions and their scores (`diffusiongemma.demo.evaluation`), and the held-out denoising loss and
accuracy of the trained and the untrained model. The card's "what was tried" table is `findings.md`, measured by hand.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
import yaml
from build_corpus import SAMPLING, SMALL_TALK_REPEATS

from diffusiongemma import AutoProcessor, DiffusionGemmaForBlockDiffusion
from diffusiongemma.demo import DEMO_HELDOUT, DEMO_MODEL, evaluate_demo
from diffusiongemma.demo.evaluation import (
    EVALUATION_SET,
    ask,
    evaluate_answers,
    load_evaluation_set,
)

HERE = Path(__file__).parent
# The training recipes, in the order they run; each starts from the one before.
PHASES = ["train.yaml", "train_more.yaml", "train_last.yaml"]

CARD = """# diffusiongemma demo model

A DiffusionGemma small enough to ship inside the package, so that `diffusiongemma generate` and `chat` give a
real, if narrow, answer with no download and no GPU. It was trained from scratch by this engine's own
`diffusiongemma train`; `recipes/demo/` in the repository rebuilds it.

## Model
DiffusionGemma's architecture (a causal encoder and a bidirectional canvas decoder on one shared backbone,
sliding and full attention layers, a dense MLP beside top-{top_k} of {experts} experts, self-conditioning) at
{parameters:,} parameters: {layers} layers, hidden size {hidden}, a {vocab}-token vocabulary, canvases of {canvas}
tokens. Weights in bfloat16, {size_mb:.1f} MiB. No vision tower.

## Data
{corpus[train_chats]:,} training chats built offline from the standard library of Python {corpus[python]}
(`recipes/demo/build_corpus.py`). For each of {corpus[objects]:,} documented functions, classes and methods of
built-in types it asks what the object does (answered by the first sentence of its docstring), which module it
is in, how to call it (its signature) and what kind of object it is, each in every one of the recipe's
phrasings (5, 3, 3 and 2 of them). A handful of greetings and questions about the model itself are repeated
{small_talk_repeats} times each. About 4% of the objects are held out: the model never saw them. The later phases
add {corpus[made_up_chats]:,} questions about the module of made-up names (`textwrap.parse_header`,
`copyreg.IssubsetDecimalexception`), which teach it to copy a name it has never seen. The tokenizer is a
byte-fallback BPE trained on the first phase's chats with the `tokenizers` library, with Gemma's special tokens
and chat template.

## Training
With AdamW (weight decay {wd}), {batch} canvases a step, self-conditioning on half the examples and the encoder's
next-token loss at weight 1, on two CPU threads of a 2-core VM ({minutes:.0f} minutes in all), in phases that each
start from the one before with a fresh warm-up and a cosine decay:

| recipe | steps | chats | learning rate | warm-up steps | decayed to |
|---|---|---|---|---|---|
{phases}

Mean diffusion loss over the last 100 steps: {final_loss:.3f}.

## Evaluation
The questions of `diffusiongemma/demo/evaluation_set.json`, asked as `diffusiongemma generate QUESTION --seed 0`
asks them (bfloat16 weights, the settings below, seed 0 before each question;
`diffusiongemma.demo.evaluation`): three questions (what it does, its module, its signature) about
{trained_objects} trained objects and about the {heldout_objects} held-out ones, each in one of the recipe's
phrasings, and the {small_talk_questions} greetings and questions about the model.

| measure | trained objects | held-out objects |
|---|---|---|
| module named correctly | {a[trained_module]:.1%} | {a[heldout_module]:.1%} |
| signature exactly right | {a[trained_signature]:.1%} | {a[heldout_signature]:.1%} |
| description: word F1 with the docstring's first sentence | {a[trained_purpose]:.3f} | {a[heldout_purpose]:.3f} |

Greetings and questions about the model answered exactly: {a[small_talk]:.0%}. Of all {a[questions]} answers,
{a[ended_with_end_of_turn]:.1%} end with the end-of-turn token. {a[tokens_per_forward]:.2f} tokens per decoder pass
and {a[steps_per_canvas]:.2f} denoising steps per canvas on average, out of at most {step_limit}.

Generation settings (`generation_config.json`): temperatures {sampling[t_max]} to {sampling[t_min]}, entropy bound
{sampling[sampler_config][entropy_bound]}, a canvas stops once its argmax has held for {sampling[stability_threshold]}
step and its mean entropy is below {sampling[confidence_threshold]}. The release uses 0.8 to 0.4, 0.1 and 0.005,
which a model this small rarely satisfies.

Denoising on the held-out chats (`diffusiongemma.demo.evaluate_demo`: each answer canvas corrupted at one noise
level drawn from seed 0 and denoised in one step, float32; the tests recompute it and allow 0.01 of difference
in accuracy across machines):

| model | cross-entropy per answer token | token accuracy |
|---|---|---|
| this model | {trained[loss]:.3f} | {trained[accuracy]:.3f} |
| untrained (the same initialization) | {untrained[loss]:.3f} | {untrained[accuracy]:.3f} |

## What was tried
{findings}
## Samples

| question | answer (seed 0) |
|---|---|
{samples}

## Limits
It is a demonstration of the engine, not an assistant. It knows only what the training questions cover, and
only in those phrasings. About objects it never saw it names the module from the question, but writes
plausible-looking, made-up descriptions and signatures; any other question gets something shaped like one of
its answers. Positions of a canvas accepted in the same step are sampled independently, so now and then two
neighbours repeat or clash. Answers are short (one to three canvases) and English only.
"""
SAMPLE_PROMPTS = ["Which module is `os.path.join` in?", "How do I call `math.sqrt`?", "What does `str.split` do?",
                  "What does `os.path.join` do?", "What is `len` for?", "How do I call `json.dumps`?", "Hello",
                  "Who are you?", "What does `zipfile.is_zipfile` do?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", type=Path)
    parser.add_argument("run", type=Path)
    parser.add_argument("--training-minutes", type=float, required=True,
                        help="how long both phases of `diffusiongemma train` took, for the card")
    args = parser.parse_args()

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(args.run / "final", dtype=torch.bfloat16)
    # The sampling settings are the recipe's current ones, whatever the training run's copy says.
    model.generation_config.update(**SAMPLING)
    if DEMO_MODEL.exists():
        shutil.rmtree(DEMO_MODEL)
    model.save_pretrained(DEMO_MODEL)
    model.generation_config.save_pretrained(DEMO_MODEL)
    for path in (args.run / "final").iterdir():
        if path.suffix in (".jinja", ".json") and not (DEMO_MODEL / path.name).exists():
            shutil.copy(path, DEMO_MODEL / path.name)
    (DEMO_MODEL / "training_log.json").unlink(missing_ok=True)
    shutil.copy(args.corpus / "heldout.jsonl", DEMO_HELDOUT)
    shutil.copy(args.corpus / "evaluation_set.json", EVALUATION_SET)

    shipped = DiffusionGemmaForBlockDiffusion.from_pretrained(DEMO_MODEL).eval()
    processor = AutoProcessor.from_pretrained(DEMO_MODEL)
    started = time.perf_counter()
    answers, results = evaluate_answers(shipped, processor)
    answers["seconds"] = time.perf_counter() - started
    samples = {prompt: ask(shipped, processor, prompt)["answer"] for prompt in SAMPLE_PROMPTS}
    figures = {"answers": answers, "trained": evaluate_demo(DEMO_MODEL),
               "untrained": evaluate_demo(args.corpus / "init"), "samples": samples, "results": results}
    (DEMO_MODEL / "evaluation.json").write_text(json.dumps(figures, indent=1) + "\n")

    items = load_evaluation_set()
    recipes = {name: yaml.safe_load((HERE / name).read_text()) for name in PHASES}
    phases = "\n".join(f"| `recipes/demo/{name}` | {r['steps']:,} | `{Path(r['train_data']).name}` | "
                        f"{_decimal(r['learning_rate'])} | {r['warmup_steps']} | {_decimal(r['min_learning_rate'])} |"
                        for name, r in recipes.items())
    log = json.loads((args.run / "final" / "training_log.json").read_text())
    card = CARD.format(
        **model_facts(shipped), a=answers, trained=figures["trained"], untrained=figures["untrained"],
        sampling=SAMPLING, step_limit=SAMPLING["max_denoising_steps"], small_talk_repeats=SMALL_TALK_REPEATS,
        trained_objects=len({i["object"] for i in items if i["split"] == "trained"}),
        heldout_objects=len({i["object"] for i in items if i["split"] == "heldout"}),
        small_talk_questions=sum(i["split"] == "small_talk" for i in items),
        phases=phases, batch=recipes[PHASES[0]]["batch_size"], wd=recipes[PHASES[0]]["weight_decay"],
        minutes=args.training_minutes, findings=(HERE / "findings.md").read_text(),
        samples="\n".join(f"| {q} | {a} |" for q, a in samples.items()),
        final_loss=statistics.mean(e["diffusion_loss"] for e in log["history"][-100:]),
        corpus=json.loads((args.corpus / "counts.json").read_text()))
    (DEMO_MODEL / "MODEL_CARD.md").write_text(card)
    print(json.dumps({k: v for k, v in figures.items() if k != "results"}, indent=1))


def _decimal(value: float) -> str:
    return f"{value:f}".rstrip("0")


def model_facts(model) -> dict:
    text = model.config.text_config
    return {"parameters": sum(p.numel() for p in model.parameters()), "layers": text.num_hidden_layers,
            "hidden": text.hidden_size, "experts": text.num_experts, "top_k": text.top_k_experts,
            "vocab": text.vocab_size, "canvas": model.config.canvas_length,
            "size_mb": (DEMO_MODEL / "model.safetensors").stat().st_size / 2**20}


if __name__ == "__main__":
    main()
