"""medllava: adapt a general LLaVA vision-language model to biomedicine.

The core package: record schema, image and DICOM loading, conversation templates and
label masking, model assembly on transformers' Llava classes, config handling and the CLI.
"""

__version__ = "0.1.0"
