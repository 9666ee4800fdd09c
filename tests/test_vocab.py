"""The vocabulary rule (NeuralTalk2's) and encode/decode round trips."""

import pytest

from captionjax import vocab as vocab_lib


@pytest.mark.parametrize("text,tokens", [
    ("A man riding a horse.", ["a", "man", "riding", "a", "horse"]),
    ("Don't stop!!", ["dont", "stop"]),  # ASCII punctuation deleted, as NeuralTalk2
    ("a man-made lake", ["a", "manmade", "lake"]),
    ("  lots   of\tspace\n", ["lots", "of", "space"]),
    ("", []),
    ("...", []),
    ("Un café au lait", ["un", "café", "au", "lait"]),
    ("“Quoted” words—dashed", ["quoted", "words", "dashed"]),  # unicode punct -> space
    ("猫が座っている。犬", ["猫が座っている", "犬"]),
    ("ÜBER GROß", ["über", "groß"]),
    ("2 dogs, 3 cats", ["2", "dogs", "3", "cats"]),
])
def test_tokenize(text, tokens):
  assert vocab_lib.tokenize(text) == tokens


def test_tokenize_rejects_non_strings():
  with pytest.raises(TypeError):
    vocab_lib.tokenize(None)


def test_threshold_is_strictly_more_than():
  caps = [["a", "dog"], ["a", "cat"], ["a", "dog"], ["the", "cat"]]
  # counts: a 3, dog 2, cat 2, the 1
  assert vocab_lib.build_vocab(caps, 1) == ["a", "cat", "dog", "UNK"]
  assert vocab_lib.build_vocab(caps, 2) == ["a", "UNK"]
  assert vocab_lib.build_vocab(caps, 0) == ["a", "cat", "dog", "the", "UNK"]


def test_encode_decode_unk_and_max_length():
  v = vocab_lib.Vocabulary(["a", "dog", "UNK"])
  assert len(v) == 3 and v.unk_id == 3
  ids = v.encode(["a", "zebra", "dog", "a", "dog"], max_length=4)
  assert ids == [1, 3, 2, 1]
  assert v.decode(ids + [0, 2]) == "a UNK dog a"  # stops at END
  assert v.decode([]) == ""


def test_vocab_json_round_trip(tmp_path):
  v = vocab_lib.Vocabulary(["a", "café", "猫", "UNK"])
  path = tmp_path / "vocab.json"
  v.save(str(path))
  import json
  data = json.loads(path.read_text(encoding="utf-8"))
  assert data == {"ix_to_word": {"1": "a", "2": "café", "3": "猫", "4": "UNK"}}
  assert vocab_lib.Vocabulary.load(str(path)).words == v.words


def test_vocab_load_error_names_file(tmp_path):
  bad = tmp_path / "vocab.json"
  bad.write_text('{"nope": 1}')
  with pytest.raises(ValueError, match="vocab.json"):
    vocab_lib.Vocabulary.load(str(bad))
