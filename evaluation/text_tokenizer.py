"""A word-level tokenizer whose ids are exactly the word tasks' token ids, so a model trained on token-level tasks
(passkey, NIAH with numbers, variable tracking, copy, parity_words) can be evaluated on their text form, e.g. by
lm-eval.

Text is lower-cased, split on whitespace and punctuation, and every digit is its own token, as in the token-level
tasks. (Hex ids of `niah_single_3` mix digits and letters inside a word and are not split per character: use the
token-level form for that task.)
"""

from __future__ import annotations

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from hybridzoo.data.tasks import word_vocabulary


def task_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    vocab = word_vocabulary(vocab_size)
    model = WordLevel({word: i for i, word in enumerate(vocab.words)}, unk_token="<pad>")
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    # id 0 is the blank of every task; it doubles as end-of-text (lm-eval needs an eos or bos to prefix contexts)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<pad>", pad_token="<pad>", eos_token="<pad>")
