"""Tokenizer and chat-template parity with the reference (transformers 5.23) on the project-made fixture."""

import json

import pytest
import torch
import transformers
from conftest import reference_processor
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel

from diffusiongemma.hf.chat_fixture import (
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    write_tokenizer,
)
from diffusiongemma.hf.processing import AutoProcessor, DiffusionGemmaProcessor
from diffusiongemma.hf.tokenizer import DiffusionGemmaTokenizer

TEXTS = [
    "",
    "Hello world",
    "The sky is blue because air scatters short wavelengths.",
    " leading space",
    "trailing spaces   ",
    "runs   of    spaces\tand\ttabs",
    "new\nlines\n\n\nand\r\nwindows\r\n",
    "\n",
    "   ",
    "Café, naïve, Zürich, crème brûlée",
    "你好，世界。日本語のテキスト。한국어",
    "Привет, мир! Γειά σου κόσμε. مرحبا",
    "Emoji 😀🎉 👩‍💻 🇫🇷 ❤️ and unseen ones 🦩🪐",
    "digits 0123456789 3.14159 1e-6 2024-05-01 12:30",
    "code: def f(x):\n    return x ** 2  # square\n",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "text<eos>more<pad><pad>",
    "<bos>already has bos",
    "image <start_of_image><image_soft_token><image_soft_token><end_of_image> here",
    "half <start_of_turn without close, <unknown> tags and <0x41> byte names",
    "unseen characters: ∮ ⊕ ℵ ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.fixture(scope="module")
def folder(tokenizer_folder):
    return tokenizer_folder


@pytest.fixture(scope="module")
def ours(folder):
    return DiffusionGemmaTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def ref(folder):
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def ref_processor(ref, folder):
    return reference_processor(ref, folder)


def test_fixture_layout(folder, ours):
    ids = write_tokenizer(folder / "again", 300)
    assert ids == {name: i for i, name in enumerate(SPECIAL_TOKENS)}
    assert len(DiffusionGemmaTokenizer.from_pretrained(folder / "again")) == 300
    assert len(ours) == 512
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["extra_special_tokens"] == {
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"
    }
    with pytest.raises(ValueError, match=f"at least {MIN_VOCAB_SIZE}"):
        write_tokenizer(folder / "tiny", 100)


def test_special_tokens_match_reference(ours, ref):
    for name in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token", "boi_token", "eoi_token", "image_token"):
        assert getattr(ours, name) == getattr(ref, name), name
        assert getattr(ours, f"{name}_id") == getattr(ref, f"{name}_id"), name
    assert ours.sep_token is None and ours.sep_token_id is None
    assert ours.special_tokens_map == ref.special_tokens_map
    assert sorted(ours.all_special_ids) == sorted(ref.all_special_ids)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_reference(ours, ref, add_special_tokens):
    for text in TEXTS:
        expected = ref(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, text
        assert ours(text, add_special_tokens=add_special_tokens)["input_ids"] == expected, text


def test_decode_matches_reference(ours, ref):
    generator = torch.Generator().manual_seed(0)
    random_ids = [torch.randint(0, len(ours), (n,), generator=generator).tolist() for n in (1, 2, 7, 50, 200)]
    sequences = [ref(text)["input_ids"] for text in TEXTS] + random_ids
    for ids in sequences:
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), ids
    assert ours.batch_decode(random_ids, skip_special_tokens=True) == ref.batch_decode(random_ids, skip_special_tokens=True)
    assert ours.decode(torch.tensor(random_ids[1])) == ref.decode(torch.tensor(random_ids[1]))
    assert ours.decode(torch.tensor([random_ids[2]] * 2)) == ref.decode(torch.tensor([random_ids[2]] * 2))
    assert ours.decode(ref.eos_token_id) == ref.decode(ref.eos_token_id)


def test_token_id_conversions_match_reference(ours, ref):
    tokens = ["<bos>", "<image_soft_token>", "▁the", "<0x41>", "never-seen-token", "a"]
    assert ours.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids("<eos>") == ref.convert_tokens_to_ids("<eos>")
    ids = ref("<bos>Hi <start_of_image> there<eos>")["input_ids"]
    for skip in (False, True):
        assert ours.convert_ids_to_tokens(ids, skip_special_tokens=skip) == ref.convert_ids_to_tokens(ids, skip_special_tokens=skip)
    assert ours.convert_ids_to_tokens(ids[1]) == ref.convert_ids_to_tokens(ids[1])


@pytest.mark.parametrize("return_tensors", [None, "pt"])
def test_batch_call_left_pads_like_reference(ours, ref, return_tensors):
    texts = ["short", "a much longer text with several words", "<start_of_turn>user\n"]
    got = ours(texts, padding=True, return_tensors=return_tensors)
    expected = ref(texts, padding=True, return_tensors=return_tensors)
    for key in ("input_ids", "attention_mask"):
        assert (got[key].tolist() if return_tensors else got[key]) == (
            expected[key].tolist() if return_tensors else expected[key]
        )
    assert got["input_ids"][0][0] == ours.pad_token_id and got["attention_mask"][0][0] == 0
    assert ours(texts)["input_ids"] == ref(texts)["input_ids"]


def test_call_rejects_bad_arguments(ours):
    with pytest.raises(ValueError, match="padding=True"):
        ours(["a", "a longer one"], return_tensors="pt")
    with pytest.raises(ValueError, match="return_tensors"):
        ours("a", return_tensors="np")
    with pytest.raises(ValueError, match="padding must be"):
        ours("a", padding="max_length")
    with pytest.raises(ValueError, match="list of strings"):
        ours([])


def test_configured_special_tokens_are_special(folder, tmp_path):
    # tokenizer.json marks <start_of_image> as ordinary; the config names it (boi_token), which makes it special.
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (tmp_path / name).write_text((folder / name).read_text())
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    for token in data["added_tokens"]:
        token["special"] = token["content"] not in ("<start_of_image>", "<start_of_turn>")
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for token in config["added_tokens_decoder"].values():
        token["special"] = token["content"] not in ("<start_of_image>", "<start_of_turn>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, ref = DiffusionGemmaTokenizer.from_pretrained(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = ref("<start_of_turn>x<start_of_image><image_soft_token><end_of_image>")["input_ids"]
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True) == "<start_of_turn>x"


def test_clean_up_tokenization_spaces_like_reference(folder, tmp_path):
    # The clean-up applies to word-level models only; the reference ignores it for BPE.
    words = ["<pad>", "<unk>", "hello", "world", ".", "?", "n't", "don", "'s", "it", ",", "!"]
    word_level = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    word_level.save(str(tmp_path / "tokenizer.json"))
    config = {"tokenizer_class": "TokenizersBackend", "clean_up_tokenization_spaces": True, "unk_token": "<unk>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, ref = DiffusionGemmaTokenizer.from_pretrained(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = ref("hello world . don n't it 's , ! ?")["input_ids"]
    for clean_up in (None, False, True):
        assert ours.decode(ids, clean_up_tokenization_spaces=clean_up) == ref.decode(ids, clean_up_tokenization_spaces=clean_up)
    bpe_ours = DiffusionGemmaTokenizer.from_pretrained(folder)
    bpe_ids = bpe_ours.encode("Hello , world !")
    assert bpe_ours.decode(bpe_ids, clean_up_tokenization_spaces=True) == "<bos>Hello , world !"


def test_missing_tokenizer_json_names_the_folder(tmp_path):
    with pytest.raises(ValueError, match=f"No tokenizer.json in '{tmp_path}'"):
        DiffusionGemmaTokenizer.from_pretrained(tmp_path)


def test_repo_ids_resolve_through_the_hub_cache_offline(folder, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    snapshot = tmp_path / "models--someone--tiny-diffusiongemma" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (snapshot / name).write_text((folder / name).read_text())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    processor = DiffusionGemmaProcessor.from_pretrained("someone/tiny-diffusiongemma")
    assert processor.tokenizer.eos_token_id == 1
    assert processor.chat_template == (folder / "chat_template.jinja").read_text()
    with pytest.raises(FileNotFoundError, match="someone/not-cached is neither a local folder nor in the Hugging Face cache"):
        DiffusionGemmaTokenizer.from_pretrained("someone/not-cached")


CONVERSATION = [
    {"role": "system", "content": "Answer in one sentence."},
    {"role": "user", "content": "Why is the sky blue?"},
    {"role": "assistant", "content": [{"type": "text", "text": "  Rayleigh scattering. "}]},
    {"role": "user", "content": [{"type": "text", "text": "And sunsets?"}, {"type": "text", "text": " 🌅"}]},
]
SHORT = [{"role": "user", "content": "Hi", "name": None}]


@pytest.fixture(scope="module")
def processor(folder):
    return DiffusionGemmaProcessor.from_pretrained(folder)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", [CONVERSATION, SHORT, [CONVERSATION, SHORT]], ids=["long", "short", "batch"])
def test_rendered_template_matches_reference(processor, ref_processor, conversation, add_generation_prompt):
    got = processor.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    assert got == ref_processor.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("return_tensors", [None, "pt"])
@pytest.mark.parametrize("conversation", [CONVERSATION, [CONVERSATION, SHORT, CONVERSATION[1:2]]], ids=["one", "batch"])
def test_tokenized_template_matches_reference(processor, ref_processor, conversation, return_tensors):
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_tensors=return_tensors)
    got = processor.apply_chat_template(conversation, return_dict=True, **kwargs)
    expected = ref_processor.apply_chat_template(conversation, return_dict=True, **kwargs)
    # Text-only prompts also get all-zero mm_token_type_ids, as from the reference.
    assert list(got) == list(expected) == ["input_ids", "attention_mask", "mm_token_type_ids"]
    for key in expected:
        assert (got[key].tolist() if return_tensors else got[key]) == (
            expected[key].tolist() if return_tensors else expected[key]
        )
    ids = processor.apply_chat_template(conversation, **kwargs)
    assert (ids == got["input_ids"]).all() if return_tensors else ids == got["input_ids"]
    assert got["input_ids"][0][0] in (processor.tokenizer.bos_token_id, processor.tokenizer.pad_token_id)


def test_unpadded_batch_matches_reference(processor, ref_processor):
    batch = [CONVERSATION, SHORT]
    got = processor.apply_chat_template(batch, tokenize=True, return_dict=True, padding=False)
    expected = ref_processor.apply_chat_template(batch, tokenize=True, return_dict=True, processor_kwargs={"padding": False})
    assert got == dict(expected)
    with pytest.raises(ValueError, match="padding=True"):
        processor.apply_chat_template(batch, tokenize=True, padding=False, return_tensors="pt")


def test_bos_is_added_only_when_the_template_has_none(processor, ref_processor):
    template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    got = processor.apply_chat_template(SHORT, tokenize=True, chat_template=template)
    assert got == ref_processor.apply_chat_template(SHORT, tokenize=True, chat_template=template)
    assert got[0][0] == processor.tokenizer.bos_token_id


def test_template_environment_matches_reference(processor, ref):
    template = (
        "{% for m in messages %}\n"
        "  {{ m | tojson }}|{{ m | tojson(indent=2) }}|{{ m | tojson(separators=(',', ':'), sort_keys=true) }}\n"
        "  {% if loop.index == 1 %}{% continue %}{% endif %}\n"
        "  {% if loop.index == 3 %}{% break %}{% endif %}\n"
        "  [{{ bos_token }}{{ image_token }}{{ boi_token }}]{{ custom }}\n"
        "{% endfor %}\n"
        "{{ strftime_now('%Y') }}{{ tools is none }}"
    )
    messages = [{"role": "user", "content": "<b>\"quoted\" & 日本</b>"}] * 4
    got = processor.apply_chat_template(messages, chat_template=template, custom="X")
    assert got == ref.apply_chat_template(messages, chat_template=template, tokenize=False, custom="X")


def test_chat_template_file_priority(folder, tmp_path):
    (tmp_path / "tokenizer.json").write_text((folder / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from tokenizer_config"}))
    assert DiffusionGemmaProcessor.from_pretrained(tmp_path).chat_template == "from tokenizer_config"
    (tmp_path / "chat_template.jinja").write_text("from jinja")
    assert DiffusionGemmaProcessor.from_pretrained(tmp_path).chat_template == "from jinja"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from json"}))
    assert DiffusionGemmaProcessor.from_pretrained(tmp_path).chat_template == "from json"
    (tmp_path / "processor_config.json").write_text(json.dumps({"chat_template": "from processor_config"}))
    assert AutoProcessor.from_pretrained(tmp_path).chat_template == "from processor_config"


def test_decode_delegates_to_the_tokenizer(processor, ref):
    ids = processor.apply_chat_template([CONVERSATION, SHORT], tokenize=True, return_tensors="pt")
    for skip in (False, True):
        assert processor.batch_decode(ids, skip_special_tokens=skip) == ref.batch_decode(ids, skip_special_tokens=skip)
        assert processor.decode(ids[1], skip_special_tokens=skip) == ref.decode(ids[1], skip_special_tokens=skip)


def test_chat_errors(processor, ref_processor):
    missing_image = [{"role": "user", "content": [{"type": "image", "url": "cat.png"}, {"type": "text", "text": "?"}]}]
    assert "<image_soft_token>?" in processor.apply_chat_template(missing_image)  # rendering never opens images
    with pytest.raises(ValueError, match="image 0 of prompt 0: image 'cat.png' is not an existing file"):
        processor.apply_chat_template(missing_image, tokenize=True)
    with pytest.raises(ValueError, match="Unknown role 'robot'"):
        processor.apply_chat_template([{"role": "robot", "content": "beep"}])
    with pytest.raises(ValueError, match="Only the first message may have the role 'system'"):
        processor.apply_chat_template(SHORT + [{"role": "system", "content": "late"}])
    with pytest.raises(ValueError, match="content parts must look like"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "text"}]}])
    with pytest.raises(ValueError, match="'role'"):
        processor.apply_chat_template([{"content": "no role"}])
    with pytest.raises(ValueError, match="non-empty list"):
        processor.apply_chat_template([])
    with pytest.raises(ValueError, match="no chat template"):
        DiffusionGemmaProcessor(processor.tokenizer).apply_chat_template(SHORT)
    # The reference raises from the template for the same inputs, with the same messages.
    with pytest.raises(Exception, match="Unknown role 'robot'"):
        ref_processor.apply_chat_template([{"role": "robot", "content": "beep"}])
