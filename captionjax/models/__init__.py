"""Models: image encoders (VGG16, SmallVGG), the LSTM language model, and
the Captioner that joins them (see captioner.py for the usage)."""

from captionjax.models.captioner import Captioner
from captionjax.models.lm import LanguageModel, LSTMCell, RNNCell
from captionjax.models.vgg import VGG16, SmallVGG

__all__ = ["Captioner", "LanguageModel", "LSTMCell", "RNNCell", "VGG16",
           "SmallVGG"]
