"""Tiny Gemma 3 (SigLIP, pooled soft tokens, Gemma3 text with 5 local : 1 global layers)."""

from dataclasses import replace

from edgevlm.processors import processor_class
from edgevlm.tiny import FACTORIES
from edgevlm.tiny.common import build_model, special_ids, text_kwargs, token_ids
from edgevlm.tiny.tokenizer import train_tokenizer

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
            "<start_of_image>", "<end_of_image>", "<image_soft_token>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

IMAGE_SIZE, PATCH, TOKENS_PER_IMAGE = 64, 8, 16


def _build(size, seed):
    import torch
    import transformers as tf

    size = replace(size, layers=12)  # two full local/global periods
    tok = train_tokenizer(
        SPECIALS, vocab_size=384, chat_template=CHAT_TEMPLATE, bos="<bos>", eos="<end_of_turn>",
        pad="<pad>", unk="<unk>",
        extra={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
               "image_token": "<image_soft_token>"})
    text = text_kwargs(size, tok, query_pre_attn_scalar=size.head_dim, sliding_window=32)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False)
    config = tf.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=TOKENS_PER_IMAGE,
        **token_ids(tok, boi_token_index="<start_of_image>", eoi_token_index="<end_of_image>",
                    image_token_index="<image_soft_token>"),
        **special_ids(tok))
    model = build_model(config)
    # From-config Gemma3 zero-initialises the projector: image features would be all zero.
    projector = model.model.multi_modal_projector
    with torch.no_grad():
        projector.mm_input_projection_weight.normal_(0.0, 32**-0.5)
    image_processor = tf.Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = processor_class("Gemma3Processor")(
        image_processor=image_processor, tokenizer=tok, image_seq_length=TOKENS_PER_IMAGE,
        chat_template=CHAT_TEMPLATE)
    return model, processor


FACTORIES.add("gemma3", _build)
