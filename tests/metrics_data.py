"""Caption text for tests/test_metrics.py (no external data needed).

TRICKY_CAPTIONS stress the tokenizer (quotes, contractions, abbreviations,
numbers, brackets, unicode); CAPTIONS are ordinary image descriptions in the
style of Flickr8k/COCO, written for these tests.
"""

TRICKY_CAPTIONS = [
    "A man's dog isn't running.",
    'The colour grey centre favourite theatre.',
    'A black-and-white dog , jumps over a log .',
    'He said "hello" to the "big" dog.',
    'Two dogs ( one brown ) play.',
    "A dog can't , won't , don't go. Cannot do it.",
    "It's 3.5 inches , 1,000 people , 5 7/8 , 1/2 cup , 10-year-old boy",
    'Mr. Smith and St. Louis , U.S. army in the U.S. The end.',
    'A man in a t-shirt.',
    'A dog... runs . . . fast',
    'A man -- running - fast --- yes',
    "Boys' toys and the girls ' hats 'quoted text' ok",
    "don't DON'T Don't can't won't ain't y'all o'clock rock'n'roll",
    'A dog & a cat ; a bird : a fish ! ? ?! #1 @home _under_ score = sign',
    'hello\tworld  multiple   spaces',
    'wanna gonna gotta lemme',
    'café naïve résumé “curly” ‘single’ – en — em … ellipsis',
    'The dog is in the St. Bernard.',
    'A man at 5 p.m. today. a.m.',
    'a b c d e. x.',
    "I'm we're they've he'll she'd",
    "'Tis the season",
    '95% of 100$ $100 ',
    'a dog/cat a*b',
    "gimme 'twas 'tis gonna wanna cannot CANNOT Gonna",
    '@home @ home a@b.com #1 ## ### #hashtag ',
    '-5 degrees 10-year-old 5-10 3-4 2-year x-ray 4x4 a+b c++ +5',
    'e.g. etc. i.e. mr. vs. no. 5 Dr. Who at the st.',
    'at the St. The dog',
    'dog.Cat dog,cat end. a. A. U.S. I.',
    "'90s 'em o'neil d'angelo rock 'n' roll jack-o'-lantern ma'am y'know can't've",
    'well--known www.google.com google.com http://x.org/a?b=c',
    '$5 5$ £5 € ° × 😀 中文 ',
    'a < b > c [x] {y} <b>bold</b>',
    "1.5 .5 5. 1,000.50 3:30 10:30pm 1st 2nd 3rd 60's dogs' 'dogs it's' don't'",
    "the man's . the men's , James's car , boss'",
    '"Quoted at start" and end "x" . "" empty " alone',
    "A dog ' s toy . dog 's , dog' s",
    'two dogs,one cat.three birds;four',
    'A DOG IS RUNNING. A Dog Is Running!!! Really?? Yes?!',
    'the 2nd- place man ; a -- b ; a---b ; a----b ; a-----b',
    'It is .. two dots .... four dots ..... five ...... six',
    'a/b/c and/or 1/2/2013 12/25/99 1/2 1\\/2',
    '5 1/2 feet 1-1/2 inch ½ ¼ ',
    'a    dog\ttab',
    "a dog ` backtick `` double backtick '' ",
    'a b.c d.e.f g.h. I.B.M. Ph.D. a.k.a.',
    '(555) 555-5555 555-555-5555',
    "it's it’s don’t dogs’ ‘quoted’ „low“ «guillemet» ‹single›",
    'a dog -- on the -grass- and -lrb- -LRB- ',
    'A man on a T.V. show. He is at the U.S. A man',
    "A girl, a boy, and a dog; they're happy: yes!",
    'dog.cat. dog.cat , dog.1 1.dog dog..cat dog.c d.cat ab.cd.ef x.y.',
    '@1abc @_x #_x #a1 a#b a@b',
    'etc. The dog etc. the dog',
    'the etc.',
    'A dog',
    'at the St.',
    'The cat',
    'running with the U.S.',
    'A man',
    'a boy no.',
    'Then',
    'two dogs play.the end',
    'A dog.',
    'a dog.',
    "x-ray. dog's. 2.5. ",
    'bigdog\'s" "Hello," she said. he\'s "the" best',
    "a boy's",
    "'s boys'",
    'A man. . . a dog',
    'ABC&D AT&T at&t r&b R&B',
    '5\'6" 5\' 6" 6ft. 100km/h 9am',
]

SUBJECTS = ["A man", "A woman", "A young boy", "The little girl", "Two dogs", "A black dog",
            "A brown and white dog", "A group of people", "A child", "A surfer", "Three men",
            "A cyclist", "A white cat", "An old man", "Two kids", "A football player"]
VERBS = ["is running", "jumps", "is sitting", "stands", "plays", "rides a bike", "walks",
         "is climbing", "swims", "is holding a ball", "looks up", "smiles", "is skiing",
         "waits", "is eating", "is catching a frisbee"]
PLACES = ["on the beach", "in the snow", "through the grass", "in a park", "on a busy street",
          "near the water", "in front of a building", "on a rock", "in the ocean",
          "down a hill", "in a field", "on a red bench", "in the air", "by the lake"]
EXTRAS = ["", "", "", "with a red shirt", "wearing a blue hat", "while another watches",
          "at night", "in the sun", "next to a tree", "with his dog"]
ENDINGS = ["", " .", ".", " !", "?"]


def make_captions(rng, count):
  """`count` raw captions from the templates, with casing and end punctuation."""
  out = []
  for _ in range(count):
    parts = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(PLACES), rng.choice(EXTRAS)]
    cap = " ".join(p for p in parts if p) + rng.choice(ENDINGS)
    out.append(cap.lower() if rng.random() < 0.3 else cap)
  return out
