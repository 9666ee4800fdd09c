"""The embedded default: a captioner trained on the generated shapes set.

    captionjax train --workdir=runs/default

NeuralTalk2's recipe in miniature, sized for a 2-core CPU (under 10 minutes
with data generation and compilation): the CNN first learns to recognize the
objects (the data set knows them: shape, color and size per grid cell), is
then frozen, and the LSTM is trained on its features, computed once per
image. One change to NeuralTalk2's model: the LSTM attends over the CNN's
3 x 3 grid cells at every word (`model.attention`); with the image seen at
the first step only, the LSTM names the colors but binds them to the wrong
shapes. Last, 300 steps of self-critical training raise CIDEr-D directly.
`configs/neuraltalk2.py` keeps NeuralTalk2's exact model. Measured results
are in the README.
"""

import ml_collections

from captionjax import decode


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # ---- data
  c.dataset = "shapes"  # "shapes" (generated on first use), or a prepro output directory
  c.shapes = ml_collections.ConfigDict()
  c.shapes.image_size = 64  # pixels a side of the generated images
  c.shapes.seed = 0  # the generator's seed
  c.shapes.num_train = 8000  # training images
  c.shapes.num_val = 500  # validation images
  c.shapes.num_test = 1000  # test images
  c.shapes.num_novel = 500  # images with held-out (color, shape) pairs
  c.shapes.cache_dir = ""  # where the set is written ("" = ~/.cache/captionjax)
  c.blank_images = False  # replace every image by a blank one (an image-blind baseline)
  c.seq_per_img = 5  # captions per image in a batch (NeuralTalk2's seq_per_img)
  c.batch_size = 32  # images per batch (all hosts together; split over the devices)
  # Devices per group that splits the large 2-D arrays (embeddings, output and fc
  # layers) and their Adam moments; 1 = every device holds the whole model (parallel.py).
  c.model_parallel = 1
  c.crop_size = 0  # random crop in training, center crop in evaluation (0 = none)
  c.flip = False  # random horizontal flips (off: captions say "left" and "right")
  c.seed = 0  # seeds parameters, data order and dropout

  # ---- model
  c.model = ml_collections.ConfigDict()
  c.model.cnn = "small_vgg"  # "small_vgg" or "vgg16"
  c.model.cnn_weights = ""  # vgg16: imported weights (`captionjax import-weights` DIR); "" = random
  c.model.cnn_kwargs = ml_collections.ConfigDict()
  c.model.cnn_kwargs.widths = (32, 64, 128)  # conv block widths
  c.model.cnn_kwargs.pool = "grid"  # grid-pooled features keep where things are
  c.model.cnn_kwargs.grid = 3  # cells a side of the pooling grid
  c.model.cnn_kwargs.pool_last = False  # keep the last block's resolution (8x8 at 64 px)
  c.model.cnn_kwargs.cell_fc = 256  # a per-cell fc layer (1x1 conv) after the grid pooling (0 = none)
  c.model.input_encoding_size = 256  # image and word embedding size
  c.model.rnn_size = 256  # LSTM hidden size
  c.model.num_layers = 1  # stacked recurrent layers
  c.model.drop_prob_lm = 0.2  # dropout in the language model
  c.model.rnn_type = "lstm"  # "lstm" or "rnn"
  c.model.image_every_step = False  # also add the image embedding to every word input
  c.model.attention = True  # attend over the CNN's grid cells at every word (needs pool="grid")
  # Compute dtype of the CNN and the LM: "float32", or "bfloat16" (mixed precision: matmuls
  # and convolutions in bfloat16, about twice the GPU/TPU throughput; the parameters, the
  # optimizer, the LSTM's gates and cell state, the logits, the loss and the beam scores stay
  # float32, so checkpoints are the same either way). Not a model field: a run may switch it.
  c.dtype = "float32"

  # ---- CNN pretraining on the data set's object labels (shapes only; 0 = off)
  c.cnn_pretrain_steps = 600  # steps of object recognition before captioning
  c.cnn_pretrain_learning_rate = 2e-3  # Adam learning rate for that phase

  # ---- caption training
  c.num_train_steps = 1000  # language-model steps
  c.cached_features = True  # frozen CNN: compute features once, train only the LM
  c.finetune_cnn_after = -1  # -1 never, 0 from the start, N after N caption steps
  c.learning_rate = 2e-3  # Adam learning rate of the language model
  c.beta1 = 0.8  # Adam beta1 (NeuralTalk2's optim_alpha)
  c.beta2 = 0.999  # Adam beta2 (NeuralTalk2's optim_beta)
  c.epsilon = 1e-8  # Adam epsilon
  c.grad_clip = 0.1  # clip each gradient element to [-c, c] (NeuralTalk2's rule)
  c.learning_rate_decay_start = 500  # caption step where the decay starts (-1 = never)
  c.learning_rate_decay_every = 250  # the rate halves every N steps after that
  # "step": x0.5 at the decay start, then x0.5 every N steps (this recipe's);
  # "neuraltalk2": NeuralTalk2's smooth 0.5 ** ((step - start) / N), also for the CNN.
  c.learning_rate_schedule = "step"
  c.cnn_learning_rate = 1e-5  # Adam learning rate of the CNN when fine-tuning
  c.cnn_weight_decay = 0.0  # L2 weight decay of the CNN when fine-tuning
  c.cnn_beta1 = 0.8  # Adam beta1 of the CNN
  c.cnn_beta2 = 0.999  # Adam beta2 of the CNN

  add_scst_fields(c)

  # ---- evaluation and decoding
  c.beam_size = 2  # beam size for the final test captions (NeuralTalk2's eval default)
  c.length_penalty = 0.0  # length normalization exponent in beam search (0 = none)
  add_decoding_fields(c)
  c.eval_every_steps = 500  # validation loss and greedy captions every N steps
  c.eval_num_images = 500  # validation images captioned and scored at each evaluation
  c.eval_batch_size = 100  # images per evaluation batch
  c.test_split = "test"  # split captioned and scored at the end
  c.extra_test_splits = ("novel",)  # also scored at the end, when the data set has them

  # ---- logging and checkpoints
  c.log_every_steps = 50  # train_log.jsonl and TensorBoard every N steps
  c.checkpoint_every_steps = 1000  # orbax checkpoint every N steps
  c.keep_checkpoints = 2  # latest checkpoints kept, plus the best by validation score
  return c


def add_scst_fields(c: ml_collections.ConfigDict) -> None:
  """Self-critical sequence training (Rennie et al. 2017) after the caption steps."""
  c.scst_steps = 300  # steps of SCST on the CIDEr-D reward (0 = off)
  c.scst_learning_rate = 1e-4  # its constant Adam learning rate (2e-4 names more absent shapes)
  c.scst_samples = 5  # captions sampled per image at each step (K)
  c.scst_baseline = "mean"  # "greedy": the greedy caption's reward; "mean": the other K-1 samples'
  c.scst_finetune_cnn = True  # go on fine-tuning the CNN in SCST if the caption phase did
  # Subtracted from a sample's reward for each shape it names that the image lacks
  # (the shapes data set's object labels; 0 = plain CIDEr-D).
  c.scst_hallucination_penalty = 0.0
  # Added to a sample's reward when it names exactly the image's objects (shapes data set).
  c.scst_exact_bonus = 0.0
  # Mixed objective: + this weight x the cross-entropy per word of the batch's reference
  # captions (teacher forcing, as in the caption phase); 0 = the policy gradient alone.
  # It keeps the captioner near what cross-entropy taught it (at twice the step's cost).
  c.scst_xe_weight = 0.0


def add_decoding_fields(c: ml_collections.ConfigDict) -> None:
  """The final test's decoding beyond beam_size and length_penalty
  (captionjax/decode.py DecodeOptions; the same flags on `captionjax caption`)."""
  c.min_length = 1  # END forbidden before this many words (0 allows an empty caption)
  c.block_trigrams = False  # forbid a word that would repeat a trigram of the caption
  c.bad_endings = ",".join(decode.BAD_ENDINGS)  # END forbidden after these words ("" = none)
  c.num_groups = 1  # diverse beam search: groups of beam_size / num_groups beams (1 = plain)
  c.diversity_lambda = 0.5  # diverse beam search: penalty per earlier group's same token
  c.sample = False  # sample one caption per image instead of the beam search
  c.temperature = 1.0  # sampling: softmax(logits / temperature)
  c.top_k = 0  # sampling: only the k likeliest words (0 = all)
  c.top_p = 1.0  # sampling: only the smallest set of likeliest words holding this mass
