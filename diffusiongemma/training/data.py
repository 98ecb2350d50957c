"""Training data for block diffusion: JSONL chats cut into the canvases `generate` would write.

Every assistant turn becomes one example per canvas of its answer. The answer is split at canvas
boundaries counted from the end of its prompt, which is where `generate` starts and commits canvases;
an example's context is the prompt plus the answer's earlier canvases (teacher forcing), and its
target is one canvas: answer tokens, the end-of-turn token that ends the answer, then padding. The
padding is a real target: the sampler stops a canvas only once every position in it is confident.

Batches group examples of similar context length (the contexts are padded on the left, so the canvases
of a batch line up after them) and are shuffled per epoch from the seed alone, so that a resumed run
sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class CanvasExample:
    context: list[int]
    target: list[int]
    # Context tokens that belong to the answer (the rest is prompt): the encoder's next-token loss.
    answer_in_context: int


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] contexts, padded on the left
    attention_mask: torch.Tensor  # [B, T] bool
    positions: torch.Tensor  # [B, T] 0 at each row's first real token
    context_lengths: torch.Tensor  # [B]
    encoder_targets: torch.Tensor  # [B, T - 1] next context token where it is an answer token, else -100
    target: torch.Tensor  # [B, canvas_length]
    answer_mask: torch.Tensor  # [B, canvas_length] bool: answer tokens and their end of turn, not padding

    def to(self, device) -> Batch:
        return Batch(**{name: value.to(device) for name, value in vars(self).items()})


def read_chats(path: str | Path) -> list[list[dict]]:
    """The `messages` of every line of a JSONL file; a line that is not a chat is a ValueError naming it."""
    chats = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{number}: expected a JSON object with a 'messages' list") from None
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise ValueError(f"{path}:{number}: 'messages' must be a list of objects")
            if not all(isinstance(m.get("content"), str) for m in messages):
                raise ValueError(f"{path}:{number}: every message needs text 'content' (training takes no images)")
            if not any(m.get("role") == "assistant" for m in messages):
                raise ValueError(f"{path}:{number}: the chat has no assistant message to learn from")
            chats.append(messages)
    if not chats:
        raise ValueError(f"{path} holds no chats")
    return chats


def canvas_examples(chats: list[list[dict]], processor, canvas_length: int, max_length: int) -> list[CanvasExample]:
    """Every canvas of every assistant turn; contexts render the earlier turns through the chat template."""
    tokenizer = processor.tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    pad = tokenizer.pad_token_id
    examples = []
    for messages in chats:
        for turn, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prompt = processor.apply_chat_template(messages[:turn], tokenize=True, add_generation_prompt=True)[0]
            answer = tokenizer.encode(message["content"].strip(), add_special_tokens=False) + [end_of_turn]
            canvases = -(-len(answer) // canvas_length)
            if len(prompt) + canvases * canvas_length > max_length:
                raise ValueError(f"a chat needs {len(prompt) + canvases * canvas_length} positions, more than the "
                                 f"model's {max_length}: {json.dumps(messages)[:200]}")
            for start in range(0, len(answer), canvas_length):
                target = answer[start:start + canvas_length]
                examples.append(CanvasExample(context=prompt + answer[:start],
                                              target=target + [pad] * (canvas_length - len(target)),
                                              answer_in_context=start))
    return examples


def collate(examples: list[CanvasExample], pad_token_id: int) -> Batch:
    longest = max(len(e.context) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(examples), longest, dtype=torch.bool)
    encoder_targets = torch.full((len(examples), longest - 1), -100, dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.context)
        input_ids[row, longest - length:] = torch.tensor(example.context)
        attention_mask[row, longest - length:] = True
        if example.answer_in_context:
            # Logit i predicts token i + 1; only answer tokens are scored, as in supervised fine-tuning.
            first = longest - example.answer_in_context
            encoder_targets[row, first - 1:] = input_ids[row, first:]
    context_lengths = attention_mask.sum(dim=1)
    positions = (torch.arange(longest)[None] - (longest - context_lengths)[:, None]).clamp(min=0)
    target = torch.tensor([e.target for e in examples])
    return Batch(input_ids=input_ids, attention_mask=attention_mask, positions=positions,
                 context_lengths=context_lengths, encoder_targets=encoder_targets, target=target,
                 answer_mask=target != pad_token_id)


def epoch_batches(examples: list[CanvasExample], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices of each batch of one epoch: examples sorted by context length (ties broken at random),
    cut into batches, batches in random order."""
    rng = random.Random(seed * 1_000_003 + epoch)
    keys = [(len(e.context), rng.random()) for e in examples]
    order = sorted(range(len(examples)), key=keys.__getitem__)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches
