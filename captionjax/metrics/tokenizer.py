"""Pure-Python re-implementation of coco-caption's caption tokenizer.

coco-caption (pycocoevalcap's `PTBTokenizer`) writes every caption of a set on
its own line, runs Stanford CoreNLP 3.4.1's `PTBTokenizer` over the whole file
with `-preserveLines -lowerCase`, then drops punctuation tokens. This module
reproduces that output without Java, so BLEU, ROUGE-L and CIDEr-D can be scored
anywhere.

The Stanford tokenizer is a JFlex scanner: at each position the rule with the
longest match wins (trailing context counts towards the length) and ties go to
the rule listed first. `_RULES` below lists the rules that matter for English
text in that order, written from the behaviour of the 3.4.1 jar (checked on
every Flickr8k caption and a stress set of odd captions; see the tests).

Known, deliberate differences:
  * A carriage return, U+2028/9, vertical tab, form feed or U+0085 inside a
    caption ends a line in the Java tokenizer, which shifts every later caption
    onto the wrong image in coco-caption. Here they are plain whitespace.
  * Characters outside the Basic Multilingual Plane (emoji) are deleted, as the
    jar does; a few rare symbol classes may differ.
"""

import re
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

# Tokens that coco-caption removes after tokenization (its PUNCTUATIONS list).
# "-LRB-" and friends are listed upper-case there but the jar has already
# lower-cased them, so "-lrb-" survives, exactly as in coco-caption.
PUNCTUATIONS = frozenset([
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!",
    ",", ":", "-", "--", "...", ";"
])

NBSP = "\u00a0"  # the jar turns spaces inside a token (fractions, phones) into this

# ---------------------------------------------------------------------------
# Character classes (JFlex macros). The JFlex scanner is %caseless for literal
# text but not for character classes, hence the explicit (?i:...) groups.
# ---------------------------------------------------------------------------
# Python's re has no \p{L}; [^\W\d_] also takes numeric symbols such as "½",
# which the jar treats as numbers, so those are excluded.
_NOT_LETTER_NUMERIC = r"\u00b2\u00b3\u00b9\u00bc-\u00be\u2070-\u2089\u2150-\u218f\u2460-\u24ff"
_LETTER = rf"(?:(?![{_NOT_LETTER_NUMERIC}])[^\W\d_])"
_DIGIT = r"\d"
_ALNUM = rf"(?:{_LETTER}|{_DIGIT})"
_SPACE = r"[ \t\u00a0\u2000-\u200a\u3000]"
_NEWLINE = r"(?:\r\n|[\n\r\u2028\u2029\u000b\u000c\u0085])"
_SPACENL = rf"(?:{_SPACE}|{_NEWLINE})"
_SGML = r"<\/?[A-Za-z!][^>\n]*>"
_SENTEND = rf"{_SPACENL}(?:{_SPACENL}|[A-Z]|{_SGML})"
_APOS = r"(?:['\u0092\u2019]|&apos;)"
_APOSETC = rf"(?:{_APOS}|[\u0091\u2018\u201b])"
_HYPHEN = r"[-_\u058a\u2010\u2011]"
_WORD = (rf"(?:{_LETTER}|&[aeiouAEIOU](?:acute|grave|uml);|"
         r"[\u00ad\u0237-\u024f\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff"
         r"\u0300-\u036f\u0483-\u0487\u0591-\u05bd\u064b-\u065e\u0900-\u0903"
         r"\u093c\u093e-\u094e])+")
_REDAUX = rf"{_APOS}(?:[msdMSD]|(?i:re|ve|ll))"
_SWORD = r"[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*"
_SREDAUX = rf"(?i:n){_APOSETC}(?i:t)"
_APOWORD = (
    rf"{_APOS}(?i:n){_APOS}?|[lLdDjJ]{_APOS}|(?i:dunkin){_APOS}|"
    rf"(?i:somethin){_APOS}|(?i:ol){_APOS}|{_APOS}(?i:em)|"
    rf"[A-HJ-XZn]{_APOSETC}{_LETTER}{{2,}}|{_APOS}[2-9]0(?i:s)|"
    rf"{_APOS}(?i:till?)|{_LETTER}+[aeiouyAEIOUY]{_APOSETC}[aeiouA-Z]{_LETTER}*|"
    rf"{_APOS}(?i:cause)|(?i:cont'd\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|"
    r"li'l|nat'l)")
_NUM = rf"(?:{_DIGIT}*(?:[.:,\u00ad\u066b\u066c]{_DIGIT}+)+|{_DIGIT}+)"
_ACRO = r"(?:[A-Za-z](?:\.[A-Za-z])+|(?i:(?:canada|sino|korean|eu|japan|non)-u\.s|u\.s\.-(?:u\.k|u\.s\.s\.r)))"
_ABMONTH = r"jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec"
_ABDAYS = r"mon|tue|tues|wed|thu|thurs|fri"
_ABSTATE = (r"(?i:ala|ariz|calif|colo|conn|dak|del|fla|ga|ind|kans?|ky|la|md|"
            r"mich|minn|mo|mont|neb|nev|okla|pa|penn|tenn|tex|va|vt|wisc?|wyo)|"
            r"A(?i:rk)|I(?i:ll)|M(?i:ass)|M(?i:iss)|O(?i:re)|W(?i:ash)")
_ABCOMP = r"inc|cos?|corp|pp?tys?|ltd|plc|bancorp|dept|bhd|assn|univ|intl|sys"
_ABNUM = r"prop|ph|tel|est|ext|sq"
_ABPTIT = r"jr|sr|bros|(?:ed|ph)\.d|blvd|rd|esq"
_ABBREV1 = (rf"(?:(?i:{_ABPTIT}|{_ABMONTH}|{_ABDAYS}|{_ABCOMP}|{_ABNUM}|etc|al|"
            rf"seq)|{_ABSTATE})\.")
_ABTITLE = (r"(?i:mr|mrs|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|"
            r"govs?|adm|rev|maj|sgt|cpl|pvt|mt|capt|ste?|ave|pres|lieut|hon|"
            r"brig|co?mdr|pfc|spc|supts?|det|ft)|M(?i:iss)")
_ABBREV4 = (rf"(?:{_ACRO}|{_ABTITLE}|(?i:a\.k\.a|vs|alex|wm|jos|cie|cf|treas|"
            rf"invt|elec|natl|m[ft]g)|[A-Za-z])")
# Capitalised words after which an acronym's period also ends the sentence.
_SENT_STARTERS = (
    "About According Additionally After An A As At But Earlier He Her Here "
    "However If In It Last Many More Mr. Ms. Now Once One Other Our She Since "
    "So Some Such That The Then There These They This We When While What Yet "
    "You").split()
_STARTER = "(?:" + "|".join(
    w[0] + "(?i:" + re.escape(w[1:]) + ")" if len(w) > 1 else w
    for w in sorted(_SENT_STARTERS, key=len, reverse=True)) + ")"
_THING_PART = rf"(?:[dDoOlL]{_APOSETC}{_ALNUM})?{_ALNUM}+"
_THING = rf"{_THING_PART}(?:{_HYPHEN}{_THING_PART})*"
_HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:[A-Za-z0-9\u00ad]+|{_ACRO}\.))+"
_THINGA = r"[A-Z]+(?:(?:[+&]|&(?i:amp);)[A-Z]+)+"
_INSENTP = r"[,;:]"
_QUOTES = (rf"(?:''|[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091-\u0094"
           rf"\u201e\u201f\u2039\u203a\u00ab\u00bb]{{1,2}}|{_APOS})")
_MISCSYMBOL = (r"[\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00ba\u00d7"
               r"\u00f7\u0387\u2020-\u2023\u2032-\u2038\u2044\u207a-\u207f"
               r"\u208a-\u208e\u2100-\u214f\u2190-\u21ff\u2200-\u22ff"
               r"\u2300-\u23ff\u2600-\u26ff\u3012\u30fb\uff01-\uff0f"
               r"\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]")


def _latex_quotes(tok: str, probably_left: bool) -> str:
  """Maps quote characters the way the jar's latexQuotes option does."""
  if probably_left:
    tok = re.sub(r"&apos;|'", "`", tok)
    tok = re.sub(r"\"|&quot;", "``", tok)
  else:
    tok = re.sub(r"&apos;|'", "'", tok)
    tok = re.sub(r"\"|&quot;", "''", tok)
  tok = re.sub("[\u0091\u2018\u201b\u2039]", "`", tok)
  tok = re.sub("[\u0092\u2019\u203a]", "'", tok)
  tok = re.sub("[\u0093\u201c\u00ab]", "``", tok)
  return re.sub("[\u0094\u201d\u00bb]", "''", tok)


_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4",
              "\u2153": "1/3", "\u2154": "2/3"}
_CURRENCY = {"\u00a2": "cents", "\u00a3": "#", "\u0080": "$", "\u00a4": "$",
             "\u20a0": "$", "\u20ac": "$"}

# An action maps the matched text to (token or None, characters consumed).
_Action = Callable[[str], Tuple[Optional[str], int]]


def _keep(text: str) -> Tuple[str, int]:
  return text, len(text)


def _const(token: str) -> _Action:
  return lambda text: (token, len(text))


def _pushback(n: int) -> _Action:
  """Emits the match minus its last `n` characters, which are scanned again."""
  return lambda text: (text[:-n], len(text) - n)


def _dup_period(text: str) -> Tuple[str, int]:
  """Emits "etc." and scans its period again (the jar's sentence-end rule)."""
  return text, len(text) - 1


def _no_soft_hyphen(text: str) -> Tuple[str, int]:
  return text.replace("\u00ad", ""), len(text)


def _quotes(probably_left: bool) -> _Action:
  return lambda text: (_latex_quotes(text, probably_left), len(text))


def _nbsp(text: str) -> Tuple[str, int]:
  return text.replace(" ", NBSP), len(text)


def _phone(text: str) -> Tuple[str, int]:
  return text.replace(" ", NBSP).replace("(", "-LRB-").replace(")", "-RRB-"), len(text)


def _fraction(text: str) -> Tuple[str, int]:
  return _FRACTIONS.get(text, text), len(text)


def _currency(text: str) -> Tuple[str, int]:
  return "".join(_CURRENCY.get(c, c) for c in text), len(text)


def _skip(text: str) -> Tuple[None, int]:
  return None, len(text)


def _split_tis(text: str) -> Tuple[str, int]:
  """Splits "'tis" / "'twas" after the "t", as the jar does ("'t is")."""
  rest = 2 if text.lower().endswith("tis") else 3
  return text[:-rest], len(text) - rest


def _hyphens(text: str) -> Tuple[str, int]:
  return ("--" if 3 <= len(text) <= 4 else text), len(text)


# (pattern, trailing context or None, action), in the jar's priority order.
_RULES: List[Tuple[str, Optional[str], _Action]] = [
    (r"(?i:cannot)", None, _pushback(3)),
    (r"(?i:gonna|gotta|lemme|gimme|wanna)", None, _pushback(2)),
    (rf"{_APOS}(?i:tis|twas)", None, _split_tis),
    (_SGML, None, _keep),
    (r"&(?:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", None, _const("--")),
    (r"&(?i:amp);", None, _const("&")),
    (r"&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);", None, _keep),
    (_WORD, _REDAUX, _no_soft_hyphen),
    (_SWORD, _SREDAUX, _no_soft_hyphen),
    (_WORD, None, _no_soft_hyphen),
    (_APOWORD, None, _keep),
    (rf"y{_APOS}", _LETTER, _keep),
    (r"https?:\/\/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-]", None, _keep),
    (r"(?:(?:www\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4})|"
     r"(?:(?:[^ \t\n\f\r\"`'<>|.!?(){},\-_$]+\.)+(?:com|net|org|edu)))"
     r"(?:\/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?", None, _keep),
    (r"[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00a0]*@(?:[^ \t\n\f\r\"<>|().\u00a0]+\.)*"
     r"[^ \t\n\f\r\"<>|().\u00a0@]+", None, _keep),
    (r"@[A-Za-z_][A-Za-z_0-9]*", None, _keep),
    (r"#[A-Za-z]+", None, _keep),
    (_REDAUX, r"[^A-Za-z]", _quotes(False)),
    (_SREDAUX, None, _quotes(False)),
    (rf"{_DIGIT}{{1,2}}[\-\/]{_DIGIT}{{1,2}}[\-\/]{_DIGIT}{{2,4}}", None, _keep),
    (rf"[\-+]?{_NUM}", None, _no_soft_hyphen),
    (r"[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|"
     r"[\u2080-\u2089]+)", None, _keep),
    (rf"(?:{_DIGIT}{{1,4}}[- \u00a0])?{_DIGIT}{{1,4}}(?:\\?\/|\u2044){_DIGIT}{{1,4}}",
     None, _nbsp),
    (r"[\u00bc\u00bd\u00be\u2153-\u215e]", None, _fraction),
    (rf"-(?i:rrb|lrb|rcb|lcb|rsb|lsb)-|(?i:c\.d\.s|pro-|anti-|s(?:&|&amp;)p-500|"
     rf"s(?:&|&amp;)ls)|(?i:cap){_APOS}(?i:n)|(?i:c){_APOS}(?i:est)", None,
     lambda t: (re.sub("(?i)&amp;", "&", t), len(t))),
    (r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?\/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}",
     None, _keep),
    (r"[A-Z]*\$|#", None, _keep),
    (r"[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1"
     r"\uffe5\uffe6]", None, _currency),
    (rf"{_ACRO}\.", rf"{_SPACENL}+{_STARTER}{_SPACENL}", _dup_period),
    (rf"(?:[A-Za-z]|(?i:no))\.", rf"{_SPACENL}+{_STARTER}{_SPACENL}",
     lambda t: (t[:-1], len(t) - 1)),
    (_ABBREV1, _SENTEND, _dup_period),
    (_ABBREV1, None, _keep),
    (rf"(?i:nos?)\.", rf"{_SPACE}*{_DIGIT}", _keep),
    (rf"{_ABBREV4}\.", None, _keep),
    (_ABBREV4, _SPACE, _keep),
    (_ACRO, _SPACENL, _keep),
    (rf"{_APOS}[0-9][0-9]", _SPACENL, _keep),
    (rf"{_WORD}\.", _INSENTP, _no_soft_hyphen),
    (r"(?:\([0-9]{3}\)[ \u00a0]?|[0-9]{3}[\- \u00a0.])[0-9]{3}[\- \u00a0.][0-9]{4}",
     None, _phone),
    (r"\"|&quot;", r"[A-Za-z0-9$]", _quotes(True)),
    (r"\"|&quot;", None, _quotes(False)),
    (r"(?i:c\+\+)", None, _keep),
    (r"\+", None, _keep),
    (r"[%&\u2030\u2031]", None, _keep),
    (r"[~^]", None, _keep),
    (r"[|\\]", None, _keep),
    (r"[<>]|&lt;|&gt;", None, _keep),
    (r"\[", None, _const("-LSB-")),
    (r"\]", None, _const("-RSB-")),
    (r"\{", None, _const("-LCB-")),
    (r"\}", None, _const("-RCB-")),
    (r"\(", None, _const("-LRB-")),
    (r"\)", None, _const("-RRB-")),
    (r"-+", None, _hyphens),
    (r"\.{3,5}|(?:\.[ \u00a0]){2,4}\.|[\u0085\u2026]", None, _const("...")),
    (r"@+|#+|_+", None, _keep),
    (r"\*+|(?:\\\*){1,3}", None, _keep),
    (_INSENTP, None, _keep),
    (r"[?!]+", None, _keep),
    (r"[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa]", None, _keep),
    (r"=", None, _keep),
    (r"\/", None, _keep),
    (rf"{_HTHING}\.", _INSENTP, _no_soft_hyphen),
    (_HTHING, None, _no_soft_hyphen),
    (rf"{_THING}\.", _INSENTP, _keep),
    (_THING, None, _keep),
    (rf"{_LETTER}+(?:\.{_LETTER}+)+\.", _INSENTP, _keep),
    (rf"{_LETTER}+(?:\.{_LETTER}+)+(?![\'\u2019])", None, _keep),
    (rf"{_THINGA}\.", _INSENTP, lambda t: (re.sub("(?i)&amp;", "&", t), len(t))),
    (_THINGA, None, lambda t: (re.sub("(?i)&amp;", "&", t), len(t))),
    (r"'", r"[A-Za-z][^ \t\n\r\u00a0]", _quotes(True)),
    (_REDAUX, None, _quotes(False)),
    (_QUOTES, None, _quotes(False)),
    (_MISCSYMBOL, None, _keep),
    (r"(?:\x00|[\u200b\u200e\u200f\ufeff\u007f]|" + _SPACE + ")+",
     None, _skip),
]

# Pattern and trailing context are one regex so that backtracking finds a
# match of the pattern that the context accepts; group 1 is the token text.
_COMPILED = [(re.compile(f"({p})" + (f"(?:{t})" if t else "")), a)
             for p, t, a in _RULES]

# Fast path: a plain ASCII word followed by a space or the end of the line can
# only be the WORD rule (except the split assimilations such as "cannot").
_FAST_WORD = re.compile(r"[A-Za-z]+(?= |\n|$)")
_ASSIMILATIONS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])


def _scan(text: str) -> List[Optional[str]]:
  """Tokenizes a whole stream; returns tokens with None marking line breaks.

  Args:
    text: str, captions joined by "\\n".

  Returns:
    list of str tokens (original case) and None for every "\\n".
  """
  out: List[Optional[str]] = []
  pos, n = 0, len(text)
  while pos < n:
    ch = text[pos]
    if ch == "\n":
      out.append(None)
      pos += 1
      continue
    if ch == " ":
      pos += 1
      continue
    m = _FAST_WORD.match(text, pos)
    if m and m.group().lower() not in _ASSIMILATIONS:
      out.append(m.group())
      pos = m.end()
      continue
    best_len, best = 0, None
    for pattern, action in _COMPILED:
      m = pattern.match(text, pos)
      if m and m.end() - pos > best_len:
        best_len, best = m.end() - pos, (m.group(1), action)
    if best is None:  # untokenizable character: the jar deletes it
      pos += 1
      continue
    token, consumed = best[1](best[0])
    if token:
      out.append(token)
    pos += max(consumed, 1)
  return out


def ptb_tokenize_lines(lines: Sequence[str]) -> List[List[str]]:
  """Runs the jar-equivalent PTB tokenizer over captions, one per line.

  The captions are scanned as one stream, as coco-caption does, since a few
  rules look across the line break (e.g. "etc." followed by a capital).

  Args:
    lines: sequence of N raw caption strings.

  Returns:
    list of N token lists, lower-cased, punctuation not yet removed.
  """
  # Newlines inside a caption become spaces (coco-caption does the same); the
  # other Unicode line breaks are treated as spaces too (see module docstring).
  cleaned = [re.sub("[\n\r\u2028\u2029\u000b\u000c\u0085]", " ", s) for s in lines]
  result: List[List[str]] = [[]]
  for tok in _scan("\n".join(cleaned)):
    if tok is None:
      result.append([])
    else:
      result[-1].append(tok.lower())
  result += [[] for _ in range(len(lines) - len(result))]
  return result[:len(lines)]


def tokenize_captions(lines: Sequence[str]) -> List[str]:
  """Tokenizes captions exactly as coco-caption's `PTBTokenizer.tokenize`.

  Args:
    lines: sequence of N raw caption strings.

  Returns:
    list of N strings: lower-cased tokens joined by single spaces, punctuation
    tokens removed.
  """
  out = []
  for tokens in ptb_tokenize_lines(lines):
    # coco-caption splits the jar's line on " " after rstrip(); a token never
    # holds a plain space, so the split gives back the jar's tokens.
    out.append(" ".join(t for t in tokens if t not in PUNCTUATIONS))
  return out


def tokenize(captions_for_image: dict) -> dict:
  """Tokenizes a {key: [caption, ...]} dict (coco-caption's interface).

  Args:
    captions_for_image: dict mapping a key to a list of raw caption strings
      (or of {"caption": str} dicts, as pycocoevalcap takes).

  Returns:
    dict with the same keys and lists of tokenized caption strings.
  """
  keys, flat = [], []
  for key, caps in captions_for_image.items():
    for c in caps:
      keys.append(key)
      flat.append(c["caption"] if isinstance(c, dict) else c)
  out: dict = {}
  for key, tok in zip(keys, tokenize_captions(flat)):
    out.setdefault(key, []).append(tok)
  return out
