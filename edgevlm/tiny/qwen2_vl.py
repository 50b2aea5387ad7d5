"""Tiny Qwen2-VL and Qwen2.5-VL."""

from edgevlm.processors import processor_class
from edgevlm.tiny import FACTORIES
from edgevlm.tiny.common import build_model, special_ids, text_kwargs, token_ids
from edgevlm.tiny.tokenizer import train_tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
            "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer():
    return train_tokenizer(
        SPECIALS, vocab_size=384, chat_template=CHAT_TEMPLATE, bos=None,
        eos="<|im_end|>", pad="<|endoftext|>",
        extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def _build(shape, qwen25: bool):
    import transformers as tf

    tok = _tokenizer()
    half = shape.dim_per_head // 2  # M-RoPE splits half the head dim into (t, h, w) sections
    sections = [half // 4, (half - half // 4) // 2]
    sections.append(half - sum(sections))
    text = text_kwargs(shape, tok, rope_parameters={
        "rope_type": "default", "rope_theta": 1e6, "mrope_section": sections})
    ids = token_ids(tok, image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
                    vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")
    if qwen25:
        vision = {**dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2,
                         out_hidden_size=shape.hidden, fullatt_block_indexes=[1, 3],
                         window_size=112), **shape.vision}
        config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids,
                                     **special_ids(tok), **shape.config)
        name = "Qwen2_5_VLProcessor"
    else:
        vision = {**dict(depth=3, embed_dim=32, hidden_size=shape.hidden, num_heads=2,
                         mlp_ratio=2), **shape.vision}
        config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **ids,
                                  **special_ids(tok), **shape.config)
        name = "Qwen2VLProcessor"
    # Tiny: 4..64 merged visual tokens per image; real sizes (presets): the hub's budget.
    max_tokens = 16384 if shape.vision else 64
    image_processor = tf.Qwen2VLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * max_tokens},
        patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = processor_class(name)(image_processor=image_processor, tokenizer=tok,
                                      chat_template=CHAT_TEMPLATE)
    return build_model(config, shape.dtype), processor


FACTORIES.add("qwen2-vl", lambda shape, seed: _build(shape, qwen25=False))
FACTORIES.add("qwen2.5-vl", lambda shape, seed: _build(shape, qwen25=True))
