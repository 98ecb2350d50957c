"""Turns a finished demo training run into the model that ships with the package, and measures it.

    python recipes/demo/finish.py CORPUS_FOLDER RUN_FOLDER

copies RUN_FOLDER/final into diffusiongemma/demo/model in bfloat16, copies the held-out chats beside
it, and prints (and writes to diffusiongemma/demo/model/evaluation.json) the figures the model card
quotes: held-out loss and token accuracy of the trained and the untrained model, and what generation
does on the held-out prompts (tokens per forward, steps per canvas, canvases that stopped early).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
from build_corpus import SAMPLING

from diffusiongemma import AutoProcessor, DiffusionGemmaForBlockDiffusion
from diffusiongemma.demo import DEMO_HELDOUT, DEMO_MODEL, evaluate_demo
from diffusiongemma.hf.streamers import StepCounter

CARD = """# diffusiongemma demo model

A DiffusionGemma small enough to ship inside the package, so that `diffusiongemma generate` and `chat` give a
real, if modest, answer with no download and no GPU. It was trained from scratch by this engine's own
`diffusiongemma train`; `recipes/demo/` in the repository rebuilds it.

## Model
DiffusionGemma's architecture (a causal encoder and a bidirectional canvas decoder on one shared backbone,
sliding and full attention layers, a dense MLP beside top-{top_k} of {experts} experts, self-conditioning) at
{parameters:,} parameters: {layers} layers, hidden size {hidden}, a {vocab}-token vocabulary, canvases of {canvas}
tokens. Weights in bfloat16, {size_mb:.1f} MiB. No vision tower.

## Data
{corpus[train_chats]:,} training chats built offline from the standard library of Python {corpus[python]}
(`recipes/demo/build_corpus.py`): for {corpus[objects]:,} documented functions, classes and methods of built-in
types, questions about what the object does (answered by the first sentence of its docstring), which module it is
in, how to call it (its signature) and what kind of object it is, each asked in one of a few phrasings drawn at
random, plus a handful of greetings. {corpus[heldout_chats]} chats about 4% of the objects are held out (`diffusiongemma/demo/heldout.jsonl`):
the model never saw those objects. The tokenizer is a byte-fallback BPE trained on the training chats with the
`tokenizers` library, with Gemma's special tokens and chat template.

## Training
Two phases of 4,000 steps of 32 canvases each, with AdamW, weight decay 0.01, self-conditioning on half the
examples and the encoder's next-token loss at weight 1, on one CPU thread (about 35 minutes per phase):
`recipes/demo/train.yaml` from the freshly initialized model (learning rate 0.002, warm-up 200 steps, cosine decay
to 0.0001), then `recipes/demo/train_more.yaml` from phase 1's model (learning rate 0.001, warm-up 100 steps,
decay to 0.00005). Mean diffusion loss over the last 100 steps: {final_loss:.3f}.

## Evaluation
On the held-out chats, each answer canvas corrupted at one noise level drawn from seed 0 and denoised in one
step (`diffusiongemma.demo.evaluate_demo`, float32 on a CPU; the tests recompute it and allow 0.01 of
difference in accuracy across machines):

| model | cross-entropy per answer token | token accuracy |
|---|---|---|
| this model | {trained[loss]:.3f} | {trained[accuracy]:.3f} |
| untrained (the same initialization) | {untrained[loss]:.3f} | {untrained[accuracy]:.3f} |

`generate` with the model's own settings (`generation_config.json`: temperatures {sampling[t_max]} to
{sampling[t_min]}, entropy bound {sampling[sampler_config][entropy_bound]}, stopping once the argmax has held for one
step and the mean entropy is below {sampling[confidence_threshold]}; the release uses 0.8 to 0.4, 0.1 and 0.005,
which a model this small rarely satisfies) on the first {generation[prompts]} held-out
prompts: {generation[tokens_per_forward_mean]:.2f} tokens per decoder pass on average,
{generation[steps_per_canvas_mean]:.1f} denoising steps per canvas out of at most {generation[step_limit]}, and
{generation[canvases_stopped_early]:.0%} of the canvases stopped early by the sampler's adaptive stopping;
{generation[answers_with_end_of_turn]:.0%} of the answers ended with the end-of-turn token.

| prompt | answer (seed 0) |
|---|---|
{samples}

## Limits
It is a demonstration of the engine, not an assistant. It knows only what the training questions cover, and
only in those phrasings; about objects it never saw it writes plausible-looking but made-up descriptions and
signatures, and for any other question it answers with something shaped like a docstring. Even on questions it
was trained on, its answers often repeat a word or garble a name ("root root", "in in"): positions of a canvas
that are accepted in the same step were sampled independently, and a model this small is rarely sure enough of
its neighbours to avoid it. Now and then it ends an answer without its end-of-turn token and then fills whole
canvases with padding up to `max_new_tokens`. Answers are short (one or two canvases) and English only.
"""
SAMPLE_PROMPTS = ["Which module is `os.path.join` in?", "How do I call `math.sqrt`?", "What does `str.split` do?",
                  "What does `os.path.join` do?", "What is `len` for?", "How do I call `json.dumps`?", "Hello"]


def generation_figures(model, processor, chats: list[list[dict]]) -> dict:
    steps_limit = model.generation_config.max_denoising_steps
    tokens_per_forward, steps, answers, ended = [], [], [], 0
    ends = set(model.generation_config.eos_token_id)
    started = time.perf_counter()
    for index, messages in enumerate(chats):
        ids = processor.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True,
                                            return_tensors="pt")
        torch.manual_seed(index)
        counter = StepCounter()
        out = model.generate(ids, streamer=counter)
        tokens_per_forward.append(float(out.tokens_per_forward[0]))
        steps.extend(counter.steps)
        generated = out.sequences[0, ids.shape[1]:]
        ended += any(int(token) in ends for token in generated)
        answers.append(processor.decode(generated, skip_special_tokens=True))
    return {"prompts": len(chats), "tokens_per_forward_mean": statistics.mean(tokens_per_forward),
            "steps_per_canvas_mean": statistics.mean(steps), "step_limit": steps_limit,
            "canvases_stopped_early": sum(s < steps_limit for s in steps) / len(steps),
            "answers_with_end_of_turn": ended / len(chats),
            "seconds": time.perf_counter() - started, "sample_answers": answers[:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", type=Path)
    parser.add_argument("run", type=Path)
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

    figures = {"trained": evaluate_demo(DEMO_MODEL), "untrained": evaluate_demo(args.corpus / "init")}
    shipped = DiffusionGemmaForBlockDiffusion.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(DEMO_MODEL)
    chats = [json.loads(line)["messages"] for line in DEMO_HELDOUT.read_text().splitlines()]
    figures["generation"] = generation_figures(shipped, processor, chats[:100])
    samples = {}
    for prompt in SAMPLE_PROMPTS:
        ids = processor.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                            add_generation_prompt=True, return_tensors="pt")
        torch.manual_seed(0)
        out = shipped.generate(ids)
        samples[prompt] = processor.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
    figures["samples"] = samples
    (DEMO_MODEL / "evaluation.json").write_text(json.dumps(figures, indent=2) + "\n")
    log = json.loads((args.run / "final" / "training_log.json").read_text())
    card = CARD.format(**model_facts(shipped), trained=figures["trained"],
                       untrained=figures["untrained"], generation=figures["generation"], sampling=SAMPLING,
                       samples="\n".join(f"| {q} | {a} |" for q, a in samples.items()),
                       final_loss=statistics.mean(e["diffusion_loss"] for e in log["history"][-100:]),
                       corpus=json.loads((args.corpus / "counts.json").read_text()))
    (DEMO_MODEL / "MODEL_CARD.md").write_text(card)
    print(json.dumps(figures, indent=2))


def model_facts(model) -> dict:
    text = model.config.text_config
    return {"parameters": sum(p.numel() for p in model.parameters()), "layers": text.num_hidden_layers,
            "hidden": text.hidden_size, "experts": text.num_experts, "top_k": text.top_k_experts,
            "vocab": text.vocab_size, "canvas": model.config.canvas_length,
            "size_mb": (DEMO_MODEL / "model.safetensors").stat().st_size / 2**20}


if __name__ == "__main__":
    main()
