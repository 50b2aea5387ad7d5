"""Tiny SmolVLM (Idefics3 architecture: SigLIP tiles, pixel shuffle, Llama text)."""

from edgevlm.processors import processor_class
from edgevlm.tiny import FACTORIES
from edgevlm.tiny.common import build_model, special_ids, text_kwargs, token_ids
from edgevlm.tiny.tokenizer import train_tokenizer

GRID = 4  # row/col tokens for up to GRID x GRID tiles
SPECIALS = (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>",
             "<fake_token_around_image>", "<image>", "<global-img>"]
            + [f"<row_{r}_col_{c}>" for r in range(1, GRID + 1) for c in range(1, GRID + 1)])

CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              image_size=32, patch_size=8)


def _build(shape, seed):
    import transformers as tf

    tok = train_tokenizer(
        SPECIALS, vocab_size=400, chat_template=CHAT_TEMPLATE, bos="<|im_start|>",
        eos="<end_of_utterance>", pad="<|im_end|>",
        extra={"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
               "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"},
    )
    vision = {**VISION, **shape.vision}
    image_size, patch = vision["image_size"], vision["patch_size"]
    top = {"scale_factor": 2, **shape.config}
    text = text_kwargs(shape, tok, model_type="llama", rope_theta=1e5)
    config = tf.SmolVLMConfig(text_config=text, vision_config=vision,
                              **token_ids(tok, image_token_id="<image>"), **special_ids(tok), **top)
    # Up to 2x2 tiles for tiny models, 4x4 (the hub's 2048 px) for real sizes.
    tiles = 4 if image_size >= 256 else 2
    image_processor = tf.SmolVLMImageProcessorPil(
        do_image_splitting=True, size={"longest_edge": image_size * tiles},
        max_image_size={"longest_edge": image_size})
    seq_len = (image_size // patch) ** 2 // top["scale_factor"] ** 2
    processor = processor_class("SmolVLMProcessor")(
        image_processor=image_processor, tokenizer=tok, image_seq_len=seq_len,
        chat_template=CHAT_TEMPLATE)
    return build_model(config, shape.dtype), processor


FACTORIES.add("smolvlm", _build)
