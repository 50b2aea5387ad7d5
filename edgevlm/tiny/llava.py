"""Tiny LLaVA-1.5 (CLIP vision, 2-layer MLP projector, Llama text)."""

from edgevlm.processors import processor_class
from edgevlm.tiny import FACTORIES
from edgevlm.tiny.common import build_model, special_ids, text_kwargs, token_ids
from edgevlm.tiny.tokenizer import train_sentencepiece

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

VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
              num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8,
              projection_dim=32)


def _build(shape, seed):
    import transformers as tf

    # Llama-2's kind of tokenizer: SentencePiece BPE, '▁' before each text segment.
    tok = train_sentencepiece(SPECIALS, vocab_size=384, chat_template=CHAT_TEMPLATE, bos="<s>",
                              eos="</s>", pad="<pad>", unk="<unk>", space_prefix=True,
                              extra={"image_token": "<image>"})
    vision = {**VISION, **shape.vision}
    image_size = vision["image_size"]
    config = tf.LlavaConfig(
        text_config=text_kwargs(shape, tok, model_type="llama"), vision_config=vision,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", **token_ids(tok, image_token_index="<image>"),
        **special_ids(tok), **shape.config)
    image_processor = tf.CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    processor = processor_class("LlavaProcessor")(
        image_processor=image_processor, tokenizer=tok, patch_size=vision["patch_size"],
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE)
    return build_model(config, shape.dtype), processor


FACTORIES.add("llava", _build)
