"""captionjax: NeuralTalk2-style CNN + LSTM image captioning in JAX/Flax.

The public API (`captionjax train` and `captionjax evaluate` run through it,
`captionjax caption` through the same batched captioner):

- `load(workdir)`: a trained `Captioner` from a `captionjax train` workdir;
- `Captioner.caption(images)`: a `Caption` per image (file paths, PIL images
  or uint8 arrays), batched and jitted;
- `Captioner.score(images, sentences)`: log P(sentence | image);
- `evaluate(references, results)`: the coco-caption metrics;
- `train(config, workdir)`: train, or resume, a run.

In a notebook:

>>> import captionjax
>>> model = captionjax.load("runs/default")
>>> caption = model.caption("photo.jpg")[0]
>>> print(caption.text)                              # doctest: +SKIP
a big white square with a purple diamond and a blue cross

Nothing heavy is imported until one of these names is used: `import
captionjax` does not import JAX or TensorFlow.
"""

__version__ = "0.1.0"  # the one place: pyproject.toml and `captionjax --version` read it

import typing as _typing

__all__ = ["load", "Captioner", "Caption", "evaluate", "train"]

if _typing.TYPE_CHECKING:  # what type checkers, IDEs and pdoc see; at run time, __getattr__
  from captionjax.api import Caption, Captioner, evaluate, load, train


def __getattr__(name: str):
  """The API's names, imported on first use (PEP 562)."""
  if name in __all__:
    from captionjax import api  # pylint: disable=g-import-not-at-top
    value = globals()[name] = getattr(api, name)
    return value
  raise AttributeError(f"module 'captionjax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(__all__))
