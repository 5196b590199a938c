"""umt5_fast: fast inference for UMT5 models, a drop-in for transformers' UMT5 classes."""
import os as _os

# The C++ extension reads this cap on its instruction sets (csrc/cpu_isa.cpp). It is checked here
# too, because an extension whose import fails is left out (the eager backend runs instead) and a
# typo would so pass unnoticed.
if _os.environ.get("UMT5_FAST_CPU_ISA", "") not in ("", "generic", "avx2", "avx512", "amx"):
    raise ValueError("UMT5_FAST_CPU_ISA must be 'generic', 'avx2', 'avx512' or 'amx', "
                     f"got {_os.environ['UMT5_FAST_CPU_ISA']!r}")
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
