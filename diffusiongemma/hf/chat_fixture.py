"""A small Gemma-style tokenizer and chat template, built offline, for tests and random checkpoints.

The files follow the released checkpoint's layout: a byte-fallback BPE `tokenizer.json` whose
pipeline is the one `GemmaTokenizer` rebuilds (spaces become "▁", unknown characters fall back to
`<0xNN>` byte tokens), special tokens at Gemma's ids, and a `chat_template.jinja` with Gemma turns.
"""

import json
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "eos_token": "<eos>",
    "bos_token": "<bos>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
    "start_of_turn_token": "<start_of_turn>",
    "end_of_turn_token": "<end_of_turn>",
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(BYTE_TOKENS)
ADDED_TOKEN_FIELDS = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")

CHAT_TEMPLATE = """\
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{ content | trim }}
    {%- else -%}
        {%- for part in content -%}
            {%- if part['type'] == 'text' -%}
                {{ part['text'] | trim }}
            {%- elif part['type'] == 'image' -%}
                <image_soft_token>
            {%- else -%}
                {{ raise_exception("Unsupported content part type '" ~ part['type'] ~ "'.") }}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{{ bos_token }}
{%- set state = namespace(system='') -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {%- if not loop.first -%}
            {{ raise_exception("Only the first message may have the role 'system'.") }}
        {%- endif -%}
        {%- set state.system = render_content(message['content']) ~ '\n\n' -%}
    {%- elif message['role'] in ['user', 'assistant', 'model'] -%}
        {{ '<start_of_turn>' ~ ('user' if message['role'] == 'user' else 'model') ~ '\n' }}
        {{- state.system ~ render_content(message['content']) ~ '<end_of_turn>\n' }}
        {%- set state.system = '' -%}
    {%- else -%}
        {{ raise_exception("Unknown role '" ~ message['role'] ~ "': use 'system', 'user' or 'assistant'.") }}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""

# Training text: enough variety that merges cover common words, digits, accents, CJK and emoji.
TRAINING_TEXT = [
    "The sky looks blue because air scatters short wavelengths of sunlight more than long ones.",
    "When the sun is low, light crosses more air, so the blue is scattered away and sunsets turn red.",
    "A block diffusion model writes a whole canvas of tokens at once, then refines it step by step.",
    "Each step keeps the tokens it is sure about and draws the others again from the model.",
    "Once a canvas is committed, the encoder reads it into the cache and the next canvas begins.",
    "Write a short poem about the sea, the wind, and the light on the water in the morning.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5\n",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(i)\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2048 3.14159 -7 1e-6 12:30 2024-05-01",
    "Café, naïve, façade, résumé, jalapeño, Zürich, smörgåsbord, crème brûlée.",
    "Привет, мир! Как дела? Γειά σου κόσμε. שלום עולם. مرحبا بالعالم.",
    "你好，世界。今天天气很好。日本語のテキストも少し。한국어 문장도 있습니다.",
    "Emoji: 😀 😂 🎉 👍 🚀 ❤️ 🌍 🐍 ✨ 👩‍💻 🇫🇷",
    "Whitespace:   three spaces,\ttab,\n\nblank line,    four spaces and a trailing space ",
    "Questions? Answers! Quotes 'single' and \"double\", (parentheses), [brackets], {braces}.",
    "user: What is the capital of France?\nmodel: The capital of France is Paris.",
]


def _train_pieces(vocab_budget: int, texts: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Learn BPE pieces and merges that never cross a word boundary, as SentencePiece's do."""
    trainer_tokenizer = Tokenizer(BPE())
    trainer_tokenizer.normalizer = normalizers.Replace(" ", "▁")
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("▁"), behavior="merged_with_next")
    trainer = BpeTrainer(vocab_size=vocab_budget, show_progress=False)
    trainer_tokenizer.train_from_iterator(texts, trainer=trainer)
    model = json.loads(trainer_tokenizer.to_str())["model"]
    pieces = sorted(model["vocab"], key=model["vocab"].get)
    return pieces, [tuple(merge) for merge in model["merges"]]


def build_tokenizer(vocab_size: int, texts: list[str] | None = None) -> Tokenizer:
    """The `tokenizers` pipeline of the fixture, with exactly `vocab_size` ids, its pieces learned from
    `texts` (the fixture's own sample text by default)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} ({len(SPECIAL_TOKENS)} special tokens "
            f"and {len(BYTE_TOKENS)} byte tokens), got {vocab_size}"
        )
    fixed = list(SPECIAL_TOKENS.values()) + BYTE_TOKENS
    pieces, merges = _train_pieces(vocab_size - len(fixed), texts if texts is not None else TRAINING_TEXT)
    pieces = [piece for piece in pieces if piece not in fixed][: vocab_size - len(fixed)]
    unused = [f"<unused{i}>" for i in range(vocab_size - len(fixed) - len(pieces))]
    vocab = {token: i for i, token in enumerate(fixed + pieces + unused)}
    merges = [merge for merge in merges if merge[0] + merge[1] in vocab]

    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS.values()])
    return tokenizer


def write_tokenizer(folder: str | Path, vocab_size: int, texts: list[str] | None = None) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja.

    Returns the id of every special token, keyed by its name (`"eos_token"`, `"boi_token"`, ...).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size, texts)
    tokenizer.save(str(folder / "tokenizer.json"))

    ids = {name: tokenizer.token_to_id(token) for name, token in SPECIAL_TOKENS.items()}
    named = {name: SPECIAL_TOKENS[name] for name in ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")}
    extra = {name: SPECIAL_TOKENS[name] for name in ("boi_token", "eoi_token", "image_token")}
    # The reference's GemmaTokenizer rebuilds its pipeline and takes its added tokens from this list.
    added_tokens_decoder = {
        str(i): {field: getattr(token, field) for field in ADDED_TOKEN_FIELDS}
        for i, token in tokenizer.get_added_tokens_decoder().items()
    }
    config = {
        "tokenizer_class": "GemmaTokenizer",
        **named,
        "extra_special_tokens": extra,
        "added_tokens_decoder": added_tokens_decoder,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
    }
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", {**named, **extra})
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return ids


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
