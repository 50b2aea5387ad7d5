"""An offline tokenizer for tiny models: byte-level BPE trained in memory.

Real families ship large vocabularies; tests need only the same *kind* of tokenizer
(byte-level BPE, the family's special tokens, a chat template), built without a hub.
"""

from __future__ import annotations

# Enough English that BPE learns merges for the calibration prompts and answers.
CORPUS = [
    "What shape is in the image? A red circle. A blue square. A green triangle.",
    "Describe the image. The image shows a gradient from dark to light.",
    "What colour is the background? The background is white, black, yellow or purple.",
    "Read the text in the image. The text says hello world edge vision language model.",
    "You are a helpful assistant. User: Assistant: the quick brown fox jumps over the lazy dog.",
    "There are two objects: a circle and a rectangle, on a noisy textured background.",
    "Answer briefly. Yes. No. One, two, three, four, five, six, seven, eight, nine, ten.",
    "Row col 1 2 3 4 5 6 7 8 9 0 image picture photo texture pattern stripes dots lines",
    # Real vocabularies have "\n\n" as one token; llama.cpp's idefics3 layout looks it up.
    "Paragraph one.\n\nParagraph two.\n\nParagraph three.\n\n\n\nEnd.\n",
]


def train_tokenizer(special_tokens: list[str], *, vocab_size: int, chat_template: str,
                    bos: str | None, eos: str, pad: str, unk: str | None = None,
                    extra: dict | None = None):
    """A PreTrainedTokenizerFast with a trained byte-level BPE and the given special tokens.

    `extra` holds family attributes processors read (e.g. image_token, boi_token) and
    goes into `extra_special_tokens`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        chat_template=chat_template,
        extra_special_tokens=extra or {},
        model_max_length=4096,
    )
