"""qerl: reinforcement learning of LLMs on NVFP4 weights with LoRA and Adaptive Quantization Noise."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import qerl.quant` stays light.
    if name == "load_model":
        from .loading import load_model

        return load_model
    raise AttributeError(name)
