"""The small demo model that ships inside the package: `model/` (its card is `model/MODEL_CARD.md`), the
held-out chats its denoising figures were measured on, and the questions its answers are scored on
(`evaluation.py`). `recipes/demo/` in the repository rebuilds it."""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL = Path(__file__).parent / "model"
DEMO_HELDOUT = Path(__file__).parent / "heldout.jsonl"
# Batch and seed of the held-out evaluation: the model card's figures are reproducible only with these.
EVALUATION_BATCH_SIZE = 32
EVALUATION_SEED = 0


def evaluate_demo(folder: str | Path = DEMO_MODEL) -> dict[str, float]:
    """Held-out loss and denoising token accuracy of a model on the demo's held-out chats, in float32 on the CPU."""
    import torch

    from ..hf.modeling import DiffusionGemmaForBlockDiffusion
    from ..hf.processing import AutoProcessor
    from ..training.data import canvas_examples, read_chats
    from ..training.trainer import evaluate

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(folder)
    examples = canvas_examples(read_chats(DEMO_HELDOUT), processor, model.config.canvas_length,
                               model.config.text_config.max_position_embeddings)
    return evaluate(model, examples, EVALUATION_BATCH_SIZE, processor.tokenizer.pad_token_id, EVALUATION_SEED)
