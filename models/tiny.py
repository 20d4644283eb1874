"""Tiny random-weight builds of the real architectures, for tests and `regdpo toy-data`.

Each writes a folder in the hub repos' layout (same diffusers/transformers classes), so the
real loading code (models.wan.load_pipeline, models.captioner.load_captioner) reads it as it
would read Wan-AI's or Salesforce's weights. Seeded, without touching the caller's RNG.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

from infra.config.critic import CRITIC_DIMENSIONS, CriticConfig
from infra.config.wan import Kind
from models.wan import SHIFT_480P, WanSpec


TINY_TEXT_DIM = 32  # UMT5 d_model = transformer text_dim
TINY_IMAGE_DIM = 32  # CLIP hidden size = transformer image_dim
TINY_IMAGE_SIZE = 32  # CLIP input side; 8-pixel patches -> 16 + 1 image tokens


def tiny_transformer_config(kind: Kind) -> dict[str, Any]:
    """A 2-block WanTransformer3DModel config with the real model's structure.

    attention_head_dim=12: rope splits it as t = 12 - 2*4 = 4, h = w = 2*(12 // 6) = 4, and
    every part must be even (complex pairs).
    """
    heads, head_dim = 2, 12
    config = dict(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                  in_channels=16, out_channels=16, text_dim=TINY_TEXT_DIM, freq_dim=32, ffn_dim=48,
                  num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                  rope_max_seq_len=64)
    if kind != "t2v":
        config["in_channels"] = 16 + 16 + 4  # noise + first-frame latent + 4 mask channels
    if kind == "i2v":  # CLIP tokens: image_dim -> inner dim, then the added K/V (inner -> inner)
        config.update(image_dim=TINY_IMAGE_DIM, added_kv_proj_dim=heads * head_dim)
    return config


def _tiny_tokenizer() -> T5Tokenizer:
    # A Unigram vocabulary like umt5's (pad=0, eos=1, unk=2, sentencepiece '▁' word starts),
    # built in memory: no download, deterministic.
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = "a the cat dog man woman walks runs on in street beach sky red blue video".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -1.0) for w in words] + [(c, -3.0) for c in letters]
    vocab += [(f"▁{c}", -3.5) for c in letters]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _tiny_text_encoder(vocab_size: int) -> UMT5EncoderModel:
    return UMT5EncoderModel(UMT5Config(
        vocab_size=vocab_size, d_model=TINY_TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))


def _tiny_vae() -> AutoencoderKLWan:
    # The real layout (3 spatial downsamples = 8x, 2 temporal = 4x, z_dim 16) with few channels.
    return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def _tiny_image_encoder() -> tuple[CLIPVisionModel, CLIPImageProcessorPil]:
    config = CLIPVisionConfig(hidden_size=TINY_IMAGE_DIM, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=TINY_IMAGE_SIZE, patch_size=8,
                              projection_dim=TINY_IMAGE_DIM)
    side = TINY_IMAGE_SIZE
    processor = CLIPImageProcessorPil(size={"shortest_edge": side},
                                      crop_size={"height": side, "width": side})
    return CLIPVisionModel(config), processor


def _tiny_scheduler() -> UniPCMultistepScheduler:
    # What Wan-AI's diffusers repos ship: UniPC over flow-matching sigmas.
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   num_train_timesteps=1000, flow_shift=SHIFT_480P)


def build_tiny(kind: Kind, path: str | Path, seed: int = 0) -> str:
    """Write a random-weight Wan pipeline of `kind` in the diffusers layout to `path`.

    Same classes and folder layout as the hub repos, so `load_pipeline(WanSpec(kind, path))`
    takes the real loading path. Seeded without touching the caller's RNG. Returns the path.
    """
    WanSpec(kind, str(path))  # validates kind
    tokenizer = _tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts: dict[str, Any] = dict(
            tokenizer=tokenizer, text_encoder=_tiny_text_encoder(len(tokenizer)), vae=_tiny_vae(),
            scheduler=_tiny_scheduler(),
            transformer=WanTransformer3DModel(**tiny_transformer_config(kind)),
        )
        if kind == "t2v":
            pipe = WanPipeline(**parts)
        elif kind == "i2v":
            parts["image_encoder"], parts["image_processor"] = _tiny_image_encoder()
            pipe = WanImageToVideoPipeline(**parts)
        else:  # Wan2.2 A14B: a high-noise and a low-noise expert, switching at 0.9 * 1000
            parts["transformer_2"] = WanTransformer3DModel(**tiny_transformer_config(kind))
            pipe = WanImageToVideoPipeline(**parts, boundary_ratio=0.9)
    pipe.save_pretrained(str(path))
    return str(path)


def build_tiny_captioner(path: str | Path, seed: int = 0) -> str:
    """Write a tiny random-weight BLIP captioner + processor to `path`; returns the path.

    The weights are seeded (same files every time) and the LM head never picks a special
    token, so every caption is `max_new_tokens` vocabulary words: never empty.
    """
    from transformers import (
        BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil,
        BlipProcessor,
    )

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]  # [DEC]: BLIP's BOS
    words = ("a the of on in with and man woman dog cat car street red blue green sky tree "
             "water road people walking running sitting city beach").split()
    vocab = {w: i for i, w in enumerate(specials + words)}
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]")  # v5: vocab dict, no file needed
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})  # no torchvision
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        text_config=dict(vocab_size=len(vocab), hidden_size=32, encoder_hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=128, pad_token_id=vocab["[PAD]"],
                         bos_token_id=vocab["[DEC]"], eos_token_id=vocab["[SEP]"],
                         sep_token_id=vocab["[SEP]"]),
        projection_dim=32,
    )
    with torch.random.fork_rng():  # seeded without touching the caller's RNG
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config)
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[: len(specials)] = -1e4
    path = str(path)
    model.save_pretrained(path)
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


# Qwen2-VL's special tokens (the hub tokenizer's names); the chat template below is a short
# form of Qwen2-VL's own (system turn, <|im_start|>role ... <|im_end|>, vision placeholders).
QWEN2VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN2VL_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_CRITIC_PIXELS = 56 * 56  # every frame resized to 56 x 56: 4 x 4 patches of 14, 4 tokens


def _tiny_critic_tokenizer() -> Any:
    """A byte-level BPE (Qwen2's tokenizer kind) trained in memory on the critic's own prompts
    and a few answers, so prompts are short in tokens: any text encodes (no unknown token),
    deterministic, no download."""
    from PIL import Image
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from infra.config.critic import CRITIC_DIMENSIONS
    from models.critic import pair_messages, point_messages

    frame = [Image.new("RGB", (8, 8))]
    corpus = [part["text"] for messages in (pair_messages("a cat", frame, frame, CRITIC_DIMENSIONS),
                                            point_messages("a dog", frame, CRITIC_DIMENSIONS))
              for part in messages[0]["content"] if part["type"] == "text"]
    corpus += ["Prompt alignment: video A follows the prompt better than video B.",
               "Subject consistency: the subject stays the same in every frame.",
               "Motion smoothness: the motion is smooth, without jitter or jumps.",
               "Aesthetic quality: colors, lighting and composition look good.",
               "Verdict: A", "Verdict: B", "Verdict: good", "Verdict: bad",
               "a cat walks on the street under a blue sky; a dog runs on the beach"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=640, special_tokens=QWEN2VL_SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=QWEN2VL_SPECIALS[1:], chat_template=QWEN2VL_CHAT_TEMPLATE)


def build_tiny_critic(path: str | Path, seed: int = 0, arch: str = "qwen2_vl",
                      answers: bool = False) -> str:
    """Write a tiny random-weight critic of the Qwen2-VL class to `path` in a hub repo's layout
    (config, weights, tokenizer, preprocessor_config.json, chat template); returns the path.

    arch: "qwen2_vl" (Qwen2VLForConditionalGeneration, as Qwen/Qwen2-VL-2B-Instruct) or
    "qwen2_5_vl" (Qwen2_5_VLForConditionalGeneration, as Qwen2.5-VL and UnifiedReward-qwen).
    Loads through models.critic.load_critic as those repos would; the image processor is
    Qwen2VLImageProcessorPil (no torchvision). Seeded (same files every time) without touching
    the caller's RNG. Its text is random: every verdict it writes is an abstain, which is what
    the critic code must make of noise.

    answers=True stands in for an instruction-tuned VLM: after the random build, a brief
    full-weight SFT (`_teach_answer_format`, seeded, deterministic on one machine) teaches it
    the answer format of models.critic's prompts, so its chains are well-formed (one line per
    CRITIC_DIMENSIONS dimension from a few stock phrasings, then `Verdict: A|B` or
    `Verdict: good|bad`) and parse_verdict counts them as votes. It is NOT a judge: it was
    trained on both verdicts of every prompt equally, on random frames, so its verdict is a
    coin flip that varies between sampled chains and carries no information about the videos,
    and its reasoning lines say nothing about them either. It exists so that toy runs take the
    paths real verdicts take (votes, majorities, scored pairs, training rounds).
    """
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessorPil)

    tokenizer = _tiny_critic_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIALS}
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                max_position_embeddings=2048,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},  # head_dim 16 / 2
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=2, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    if arch == "qwen2_vl":
        config_cls, model_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        vision.update(embed_dim=32, mlp_ratio=2)
    elif arch == "qwen2_5_vl":  # windowed vision attention: 1 window = 2 x 2 merged tokens
        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision.update(intermediate_size=64, out_hidden_size=32, window_size=56,
                      fullatt_block_indexes=[1])
    else:
        raise ValueError(f"tiny critic arch {arch!r} is not qwen2_vl or qwen2_5_vl")
    config = config_cls(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": TINY_CRITIC_PIXELS,
                                                     "longest_edge": TINY_CRITIC_PIXELS})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    if answers:
        _teach_answer_format(model, tokenizer, image_processor, seed)
    path = str(path)
    model.save_pretrained(path)
    # The hub repos' layout: the image processor's preprocessor_config.json beside the
    # tokenizer files and the chat template (no processor_config.json to lean on).
    image_processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# The answer-format SFT of build_tiny_critic(answers=True). Full weights: a LoRA cannot lift
# the random lm_head's tiny logits far enough to make the format the likely text.
ANSWER_SFT_STEPS = 100  # 60-80 left a third or more of the chains malformed
ANSWER_SFT_LR = 1e-2
ANSWER_SFT_PROMPTS = 8  # pairwise and as many pointwise prompts per step, both verdicts each
# Two stock phrasings per dimension, so sampled chains differ in more than their verdict;
# they describe nothing. Words the tiny tokenizer knows (short chains), and no phrasing shared
# between dimensions: the line just written tells the 2-layer model which line comes next
# (with one "fine." for all, it skipped and repeated lines).
ANSWER_PHRASINGS = {
    "prompt alignment": ("follows the prompt.", "it follows the prompt."),
    "subject consistency": ("stays the same.", "the subject stays the same."),
    "motion smoothness": ("smooth.", "the motion is smooth."),
    "aesthetic quality": ("colors look good.", "the lighting is good."),
}
_SFT_CAPTIONS = ("a cat walks on the street", "a dog runs on the beach", "a red car on a road",
                 "colour bars glide over a soft background", "a man walks in the city",
                 "a bright pattern swings", "a woman sitting by the water", "a blue sky")


def answer_text(verdict: str, rng: random.Random) -> str:
    """One well-formed chain of the answer format (models.critic.parse_verdict) with `verdict`,
    its reasoning lines drawn from ANSWER_PHRASINGS."""
    lines = [f"{d[0].upper()}{d[1:]}: {rng.choice(ANSWER_PHRASINGS[d])}" for d in CRITIC_DIMENSIONS]
    return "\n".join([*lines, f"Verdict: {verdict}"])


def _sft_frames(count: int, gen: torch.Generator) -> list[Any]:
    """`count` random frames of the kinds videos show a random vision tower: flat colour,
    smooth blobs (a few random pixels upsampled) and noise."""
    from PIL import Image

    frames = []
    for _ in range(count):
        cells = (1, 4, 28)[int(torch.randint(3, (1,), generator=gen))]
        pixels = torch.randint(0, 256, (cells, cells, 3), generator=gen, dtype=torch.uint8)
        frames.append(Image.fromarray(pixels.numpy()).resize((28, 28), Image.BILINEAR))
    return frames


def _teach_answer_format(model: Any, tokenizer: Any, image_processor: Any, seed: int) -> float:
    """Full-weight SFT of a random critic on the answer format (both verdicts of every prompt,
    loss per token over models.critic's prompts and response log-probs); returns the last
    step's loss. Seeded inside a forked RNG, on one thread: the same weights every time on a
    machine, whatever its core count and the caller's RNG."""
    from models.critic import (Critic, FrameProcessor, judgment_inputs, pair_messages,
                               point_messages, response_ids, response_logprobs)

    critic = Critic(FrameProcessor(image_processor, tokenizer, chat_template=QWEN2VL_CHAT_TEMPLATE),
                    model, CriticConfig())
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=ANSWER_SFT_LR)
    threads = torch.get_num_threads()
    loss = torch.zeros(())
    try:
        torch.set_num_threads(1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.train()
            for _ in range(ANSWER_SFT_STEPS):
                batch = []
                for _ in range(ANSWER_SFT_PROMPTS):
                    prompt, n = rng.choice(_SFT_CAPTIONS), rng.randint(1, 3)
                    batch.append((pair_messages(prompt, _sft_frames(n, gen), _sft_frames(n, gen),
                                                CRITIC_DIMENSIONS), ("A", "B")))
                    batch.append((point_messages(prompt, _sft_frames(n, gen), CRITIC_DIMENSIONS),
                                  ("good", "bad")))
                answers = [[response_ids(critic, answer_text(v, rng)) for v in verdicts]
                           for _, verdicts in batch]
                tokens = sum(len(a) for group in answers for a in group)
                optimizer.zero_grad()
                loss = torch.zeros(())
                for (messages, _), group in zip(batch, answers):  # one prompt at a time: memory
                    inputs = judgment_inputs(critic, messages)
                    part = -response_logprobs(model, inputs, group, tokenizer.pad_token_id).sum()
                    (part / tokens).backward()
                    loss += part.detach() / tokens
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
        model.eval()
        model.zero_grad(set_to_none=True)
    return float(loss)
