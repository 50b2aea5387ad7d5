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


def train_sentencepiece(special_tokens: list[str], *, vocab_size: int, chat_template: str,
                        bos: str, eos: str, pad: str, unk: str, space_prefix: bool,
                        extra: dict | None = None):
    """A PreTrainedTokenizerFast over a SentencePiece BPE model trained in memory with the
    `sentencepiece` package (byte fallback, digits split), laid out as the hub's Llama-2 and
    Gemma tokenizer.json files are: the pieces in score order, merges ranked by the merged
    piece, a '▁' written before each text segment when `space_prefix` (Llama-2) and not
    (Gemma). `special_tokens` take the first ids, in order, as the real vocabularies do.
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_proto=sentencepiece_model(
        special_tokens, unk=unk, vocab_size=vocab_size, space_prefix=space_prefix))
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    tok = Tokenizer(models.BPE(vocab, generate_merges(vocab), unk_token=unk, byte_fallback=True,
                               fuse_unk=True))
    steps = [normalizers.Replace(" ", "\u2581")]
    tok.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("\u2581")] if space_prefix else []) + steps)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t in special_tokens])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
        chat_template=chat_template, extra_special_tokens=extra or {}, model_max_length=4096,
        add_bos_token=True, add_eos_token=False)


def sentencepiece_model(special_tokens: list[str], *, unk: str, vocab_size: int,
                        space_prefix: bool) -> bytes:
    """A tokenizer.model (serialized SentencePiece BPE) trained on CORPUS, deterministic."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, add_dummy_prefix=space_prefix,
        remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, unk_id=special_tokens.index(unk), bos_id=-1,
        eos_id=-1, pad_id=-1,
        control_symbols=[t for t in special_tokens if t != unk], minloglevel=2, num_threads=1)
    return model.getvalue()
