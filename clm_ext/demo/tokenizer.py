"""A small byte-level BPE tokenizer trained on the demo corpus, wrapped as a transformers tokenizer.

Byte-level so that decode(encode(text)) == text and a completion tokenized apart from its prompt
(as TRL does) gets the same tokens as inside the full text. The alphabet is the bytes the corpus uses
(not all 256), so a 512-entry vocabulary holds every corpus word whole. Nothing is downloaded.
"""
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def train_tokenizer(texts: list, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train on `texts`; special tokens take ids 0 (pad), 1 (bos), 2 (eos)."""
    if vocab_size < 64:
        raise ValueError(f"train_tokenizer: vocab_size must be at least 64, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="left"
    )
