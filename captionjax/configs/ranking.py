"""The ranking model: image-sentence alignment on the default shapes set.

    captionjax train --config=ranking --workdir=runs/ranking
    captionjax rank --checkpoint=runs/ranking --split=test

Karpathy and Fei-Fei's alignment model ("Deep Visual-Semantic Alignments",
2015; models/ranking.py): the CNN's 3 x 3 grid cells and the words of a
sentence (a bidirectional RNN) in one space, an image-sentence score summing
each word's best region's rectified dot product, trained with the
bidirectional max-margin ranking loss. Everything before it is the default
recipe's: the same data, CNN pretraining on the objects, the CNN frozen and
its features cached (`--start_from=runs/default` takes a captioner run's CNN
instead of pretraining one). At the end the test split's first
`rank_num_images` images and their sentences are ranked into ranking.json.
"""

from captionjax.configs import default


def get_config():
  c = default.get_config()
  c.model.kind = "ranking"  # the alignment model (models/ranking.py), not the captioner
  c.model.embed_size = 256  # H: the space of regions and words (and the BRNN's width)
  c.model.rectify = True  # a word's score: max(0, best region's dot product) (False: the dot)
  # (model.input_encoding_size is the word embedding's size; the captioner's LSTM
  # fields are unused.)
  c.ranking_margin = 1.0  # the max-margin loss's margin
  c.ranking_clip_norm = 10.0  # clip the gradient's global norm
  c.ranking_weight_decay = 0.0  # L2 weight decay of the alignment model
  c.batch_size = 64  # images per batch (x seq_per_img sentences): more negatives per step
  c.num_train_steps = 2000  # alignment model steps
  c.learning_rate = 2e-4  # Adam (beta1 etc. as the default's); at 1e-3 the rectified score dies
  c.learning_rate_decay_start = 1500  # step where halving starts (-1 = never)
  c.learning_rate_decay_every = 500  # halve the learning rate every N steps
  c.eval_every_steps = 500  # validation loss and R@K every N steps
  c.eval_num_images = 500  # validation images (and their sentences) ranked
  c.rank_num_images = 1000  # test images (and their sentences) ranked at the end
  c.extra_test_splits = ()  # the final test ranks config.test_split
  c.scst_steps = 0  # self-critical training is the captioner's
  return c
