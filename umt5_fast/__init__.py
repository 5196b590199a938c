"""umt5_fast: fast inference for UMT5 models, a drop-in for transformers' UMT5 classes."""
from umt5_fast.config import UMT5Config
from umt5_fast.model import (UMT5EncoderModel, UMT5ForConditionalGeneration, UMT5ForQuestionAnswering,
                             UMT5ForSequenceClassification, UMT5ForTokenClassification, UMT5Model,
                             UMT5PreTrainedModel)

__version__ = "0.1.0"
__all__ = ["UMT5Config", "UMT5Model", "UMT5ForConditionalGeneration", "UMT5EncoderModel",
           "UMT5ForSequenceClassification", "UMT5ForTokenClassification", "UMT5ForQuestionAnswering",
           "UMT5PreTrainedModel", "UMT5Tokenizer"]


def __getattr__(name):
    if name == "UMT5Tokenizer":  # sentencepiece is imported only when the tokenizer is used
        from umt5_fast.tokenizer import UMT5Tokenizer
        return UMT5Tokenizer
    raise AttributeError(f"module 'umt5_fast' has no attribute {name!r}")
