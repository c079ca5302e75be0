"""phi3: run, evaluate, fine-tune and train Phi-3-family models on your own hardware."""

__version__ = "0.1.0"
