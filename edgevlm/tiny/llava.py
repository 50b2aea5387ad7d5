"""Tiny LLaVA-1.5 (CLIP vision, 2-layer MLP projector, Llama text)."""

from edgevlm.processors import processor_class
from edgevlm.tiny import FACTORIES
from edgevlm.tiny.common import build_model, special_ids, text_kwargs, token_ids
from edgevlm.tiny.tokenizer import train_tokenizer

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

IMAGE_SIZE, PATCH = 32, 8


def _build(size, seed):
    import transformers as tf

    tok = train_tokenizer(SPECIALS, vocab_size=384, chat_template=CHAT_TEMPLATE, bos="<s>",
                          eos="</s>", pad="<pad>", unk="<unk>", extra={"image_token": "<image>"})
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=3, num_attention_heads=2, image_size=IMAGE_SIZE,
                  patch_size=PATCH, projection_dim=32)
    config = tf.LlavaConfig(
        text_config=text_kwargs(size, tok, model_type="llama"), vision_config=vision,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", **token_ids(tok, image_token_index="<image>"),
        **special_ids(tok))
    image_processor = tf.CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = processor_class("LlavaProcessor")(
        image_processor=image_processor, tokenizer=tok, patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE)
    return build_model(config), processor


FACTORIES.add("llava", _build)
