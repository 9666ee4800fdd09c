"""captionjax: NeuralTalk2-style CNN + LSTM image captioning in JAX/Flax."""

__version__ = "0.1.0"
