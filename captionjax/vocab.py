"""Caption text to ids and back, with NeuralTalk2's vocabulary rule.

Id 0 is END; it also serves as the START input and as padding. Words are ids
1..V in order of decreasing count (ties broken alphabetically), and `UNK`, the
stand-in for every rare or unseen word, is always the last id V.
"""

import collections
import json
import os
import string
import unicodedata

END_ID = 0
UNK = "UNK"
_ASCII_PUNCTUATION = frozenset(string.punctuation)
_DELETE_ASCII_PUNCTUATION = str.maketrans("", "", string.punctuation)


def tokenize(caption: str) -> list[str]:
  """NeuralTalk2's rule: lowercase, drop punctuation, split on white space.

  ASCII punctuation is deleted, exactly as NeuralTalk2 did ("don't" ->
  "dont", "man-made" -> "manmade"). Other Unicode punctuation (em dashes,
  curly quotes, CJK full stops), which NeuralTalk2 left inside words, becomes
  a space; letters of every script are kept as they are.
  """
  if not isinstance(caption, str):
    raise TypeError(f"caption must be a string, got {type(caption).__name__}")
  if caption.isascii():  # the fast path, and NeuralTalk2's rule exactly
    return caption.lower().translate(_DELETE_ASCII_PUNCTUATION).split()
  text = unicodedata.normalize("NFC", caption).lower()
  text = "".join(_map_char(c) for c in text)
  return text.split()


def _map_char(c: str) -> str:
  if c in _ASCII_PUNCTUATION:
    return ""
  if unicodedata.category(c)[0] in "PZ":
    return " "
  return c


def build_vocab(token_lists, word_count_threshold: int) -> list[str]:
  """Words seen more than `word_count_threshold` times, most frequent first.

  Returns the words for ids 1..V; `UNK` is appended last.
  """
  counts = collections.Counter(w for tokens in token_lists for w in tokens)
  counts.pop(UNK, None)
  words = [w for w, n in counts.items() if n > word_count_threshold]
  words.sort(key=lambda w: (-counts[w], w))
  return words + [UNK]


class Vocabulary:
  """A bidirectional word <-> id map (ids 1..V; 0 is END)."""

  def __init__(self, words: list[str]):
    if not words or words[-1] != UNK:
      words = [w for w in words if w != UNK] + [UNK]
    self.words = list(words)
    self.word_to_ix = {w: i + 1 for i, w in enumerate(self.words)}
    if len(self.word_to_ix) != len(self.words):
      raise ValueError("vocabulary has duplicate words")

  def __len__(self) -> int:
    """V, the number of words (the model predicts V + 1 classes)."""
    return len(self.words)

  @property
  def unk_id(self) -> int:
    return self.word_to_ix[UNK]

  def encode(self, tokens: list[str], max_length: int) -> list[int]:
    """Token list -> ids (rare words to UNK), cut at `max_length`."""
    unk = self.unk_id
    return [self.word_to_ix.get(w, unk) for w in tokens[:max_length]]

  def decode(self, ids) -> str:
    """Ids -> caption string, stopping at the first END (0)."""
    out = []
    for i in ids:
      i = int(i)
      if i == END_ID:
        break
      out.append(self.words[i - 1] if 0 < i <= len(self.words) else UNK)
    return " ".join(out)

  def to_json(self) -> dict:
    return {"ix_to_word": {str(i + 1): w for i, w in enumerate(self.words)}}

  def save(self, path: str) -> None:
    """Writes vocab.json, atomically (captionjax/files.py)."""
    from captionjax import files  # pylint: disable=g-import-not-at-top
    files.write_json(path, self.to_json(), indent=0)

  @classmethod
  def load(cls, path: str) -> "Vocabulary":
    """Reads `vocab.json` ({"ix_to_word": {"1": word, ...}}) or a prepro dir."""
    if os.path.isdir(path):
      path = os.path.join(path, "vocab.json")
    try:
      with open(path, encoding="utf-8") as f:
        ix_to_word = json.load(f)["ix_to_word"]
      n = len(ix_to_word)
      words = [ix_to_word[str(i)] for i in range(1, n + 1)]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{path}: not a vocabulary file with ix_to_word 1..V ({e})") from None
    return cls(words)
