"""A word-level tokenizer for the shapes world.

A real BPE vocabulary would need a download; the shapes world has a closed vocabulary,
so a word-level `tokenizers` model saved as a normal `PreTrainedTokenizerFast` is both
honest and tiny. OPT-style models get a leading BOS, T5-style ones a trailing EOS, as
their hub tokenizers do.
"""

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>", "<image>"]

WORDS = (
    "question answer what color is the shape object how many shapes are there a an and "
    "of in on yes no one two three four zero circle square triangle red green blue "
    "yellow purple orange left right picture image photo with"
).split()

PUNCTUATION = ["?", ":", ".", ","]


def build_tokenizer(family: str = "opt") -> PreTrainedTokenizerFast:
    """Return a saved-able tokenizer; `family` is "opt" (BOS first) or "t5" (EOS last)."""
    if family not in ("opt", "t5"):
        raise ValueError(f"unknown tokenizer family {family!r}: use 'opt' or 't5'")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + PUNCTUATION + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    if family == "opt":
        template = processors.TemplateProcessing(
            single="</s> $A", pair="</s> $A $B", special_tokens=[("</s>", vocab["</s>"])]
        )
    else:
        template = processors.TemplateProcessing(
            single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", vocab["</s>"])]
        )
    core.post_processor = template
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer
