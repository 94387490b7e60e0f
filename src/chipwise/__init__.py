"""chipwise: pre-train Llama-style models on any accelerator, and measure what each chip costs."""

__version__ = "0.1.0"
