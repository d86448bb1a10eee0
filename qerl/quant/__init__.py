"""Weight formats (plain-PyTorch references) and the quantized Linear."""

from .formats import FORMATS, FormatError, WeightFormat, get_format
from .linear import QuantLinear
from .mxfp4 import mxfp4_dequantize, mxfp4_quantize
from .nf4 import nf4_dequantize, nf4_quantize
from .nvfp4 import nvfp4_dequantize, nvfp4_global_scale, nvfp4_quantize

__all__ = [
    "FORMATS",
    "FormatError",
    "WeightFormat",
    "get_format",
    "QuantLinear",
    "nvfp4_quantize",
    "nvfp4_dequantize",
    "nvfp4_global_scale",
    "mxfp4_quantize",
    "mxfp4_dequantize",
    "nf4_quantize",
    "nf4_dequantize",
]
