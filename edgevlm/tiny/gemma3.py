"""Tiny Gemma 3 (SigLIP, pooled soft tokens, Gemma3 text with 5 local : 1 global layers)."""

from edgevlm.processors import processor_class
from edgevlm.tiny import FACTORIES
from edgevlm.tiny.common import build_model, special_ids, text_kwargs, token_ids
from edgevlm.tiny.tokenizer import train_sentencepiece

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

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              image_size=64, patch_size=8, vision_use_head=False)


def _build(shape, seed):
    import torch
    import transformers as tf
    # Gemma's kind of tokenizer: SentencePiece BPE without a '▁' prefix.
    tok = train_sentencepiece(
        SPECIALS, vocab_size=384, chat_template=CHAT_TEMPLATE, bos="<bos>", eos="<end_of_turn>",
        pad="<pad>", unk="<unk>", space_prefix=False,
        extra={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
               "image_token": "<image_soft_token>"})
    # 12 layers by default: two full local/global periods.
    text = text_kwargs(shape, tok, default_layers=12, query_pre_attn_scalar=shape.dim_per_head,
                       sliding_window=32)
    vision = {**VISION, **shape.vision}
    top = {"mm_tokens_per_image": 16, **shape.config}
    config = tf.Gemma3Config(
        text_config=text, vision_config=vision, **top,
        **token_ids(tok, boi_token_index="<start_of_image>", eoi_token_index="<end_of_image>",
                    image_token_index="<image_soft_token>"),
        **special_ids(tok))
    model = build_model(config, shape.dtype)
    # From-config Gemma3 zero-initialises the projector: image features would be all zero.
    projector = model.model.multi_modal_projector
    with torch.no_grad():
        projector.mm_input_projection_weight.normal_(0.0, vision["hidden_size"] ** -0.5)
    size = vision["image_size"]
    image_processor = tf.Gemma3ImageProcessorPil(size={"height": size, "width": size})
    processor = processor_class("Gemma3Processor")(
        image_processor=image_processor, tokenizer=tok, image_seq_length=top["mm_tokens_per_image"],
        chat_template=CHAT_TEMPLATE)
    return model, processor


FACTORIES.add("gemma3", _build)
