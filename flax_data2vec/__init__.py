"""flax_data2vec: Data2Vec audio and text models in JAX/Flax, numerically matching transformers."""

from .config import Data2VecAudioConfig, Data2VecTextConfig
from .audio import Data2VecAudioModel

__version__ = "0.1.0"
