"""NeuralTalk2's own model and optimizer settings on the default shapes set.

    captionjax train --config=neuraltalk2 --workdir=runs/neuraltalk2

The model of misc/LanguageModel.lua: one image embedding fed at the first
step only (no attention), input encoding and LSTM of 512, dropout 0.5, Adam
at 4e-4 with beta1 0.8, NeuralTalk2's learning-rate decay. Everything else (data, CNN
pretraining, cached features) as `default.py`. On shapes this model learns
the colors but binds them to the wrong shapes (see the README's ablation);
it is here for comparison and as the starting point for real data.
"""

from captionjax.configs import default


def get_config():
  c = default.get_config()
  c.model.attention = False  # the image at the first step only
  c.model.image_every_step = False  # (NeuralTalk2 never feeds it again)
  c.model.input_encoding_size = 512  # NeuralTalk2's input_encoding_size
  c.model.rnn_size = 512  # NeuralTalk2's rnn_size
  c.model.drop_prob_lm = 0.5  # NeuralTalk2's drop_prob_lm
  c.learning_rate = 4e-4  # NeuralTalk2's learning_rate
  c.num_train_steps = 3000  # language-model steps
  c.learning_rate_decay_start = 1500  # NeuralTalk2 starts decaying late
  c.learning_rate_decay_every = 750  # the rate halves every N steps after that
  c.learning_rate_schedule = "neuraltalk2"  # 0.5 ** ((step - start) / every), CNN too
  c.eval_every_steps = 1000  # validation every N steps
  c.scst_steps = 0  # NeuralTalk2 had no self-critical training
  return c
