"""The captioner loads tiny random-weight VLMs through the same path as hub models."""

import huggingface_hub.constants
import pytest
import torch
from PIL import Image

from infra.config import CaptionConfig
from models.captioner import load_captioner
from models.tiny import build_tiny_captioner


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> str:
    return build_tiny_captioner(tmp_path_factory.mktemp("tiny_blip"))


def frame(color=(200, 40, 40), size=(64, 48)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_tiny_blip_captions_an_image(tiny_blip):
    captioner = load_captioner(CaptionConfig(model=tiny_blip, max_new_tokens=8))
    text = captioner.caption(frame())
    assert isinstance(text, str) and text.strip() == text and len(text.split()) == 8
    assert captioner.caption(frame()) == text  # greedy: deterministic
    assert captioner.caption(Image.new("L", (30, 90), 128))  # grayscale, odd size


def test_prompt_is_the_caption_prefix(tiny_blip):
    captioner = load_captioner(CaptionConfig(model=tiny_blip, prompt="a dog on", max_new_tokens=4))
    text = captioner.caption(frame())
    assert text.startswith("a dog on ") and len(text.split()) == 3 + 4


def test_build_is_deterministic(tmp_path):
    a = load_captioner(CaptionConfig(model=build_tiny_captioner(tmp_path / "a")))
    b = load_captioner(CaptionConfig(model=build_tiny_captioner(tmp_path / "b")))
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_same_model_loads_once(tiny_blip):
    a = load_captioner(CaptionConfig(model=tiny_blip))
    b = load_captioner(CaptionConfig(model=tiny_blip))
    c = load_captioner(CaptionConfig(model=tiny_blip, prompt="a", max_new_tokens=3))
    assert a == b and a.model is b.model is c.model and a.processor is c.processor
    assert not a.model.training


@pytest.mark.parametrize("name", ["nobody/no-such-captioner", "/nonexistent/captioner", "."])
def test_missing_model_is_a_clear_error(name, monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once at import; patch the parsed value as well.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="normalize.caption.model") as err:
        load_captioner(CaptionConfig(model=name))
    assert repr(name) in str(err.value) and "Traceback" not in str(err.value)


def test_no_model_configured():
    with pytest.raises(ValueError, match="normalize.caption.model is not set"):
        load_captioner(CaptionConfig())


def test_chat_vlm_answers_without_echoing_the_prompt(tmp_path):
    """A tiny Llava with a chat template: the prompt goes through the template."""
    from transformers import (
        BertTokenizer, CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
        LlavaForConditionalGeneration, LlavaProcessor,
    )

    words = "user assistant describe this image in one sentence a dog cat red".split()
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<image>"] + words)}
    template = (
        "{% for m in messages %}{{ m['role'] }} {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}"
        "{% endfor %}{% endfor %}{% if add_generation_prompt %}assistant {% endif %}"
    )
    LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=BertTokenizer(vocab=vocab, extra_special_tokens=["<image>"]),
        patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token="<image>", chat_template=template,
    ).save_pretrained(tmp_path)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(LlavaConfig(
            vision_config=CLIPVisionConfig(**small, image_size=32, patch_size=8, projection_dim=32),
            text_config=LlamaConfig(**small, vocab_size=len(vocab), num_key_value_heads=2,
                                    pad_token_id=0, bos_token_id=2, eos_token_id=3),
            image_token_id=vocab["<image>"], vision_feature_layer=-1,
        ))
    model.save_pretrained(tmp_path)

    captioner = load_captioner(CaptionConfig(model=str(tmp_path), max_new_tokens=5))
    assert captioner.chat
    text = captioner.caption(frame())
    # The templated prompt alone is 9+ words; only the <= 5 generated tokens may come back.
    assert isinstance(text, str) and 0 < len(text.split()) <= 5
