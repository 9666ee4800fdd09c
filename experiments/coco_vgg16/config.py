"""NeuralTalk2 on COCO: ImageNet VGG16, frozen CNN first, then fine-tuning, then SCST.

    captionjax train --config=experiments/coco_vgg16/config.py --workdir=runs/coco_vgg16

NeuralTalk2's `train.lua` defaults, on the data and weights prepared as the
README beside this file says (`data/coco_224`, `weights/vgg16_imagenet`;
scripts/05_train.sh passes the paths under coco_run/ and runs the two stages).
Fields not set here keep the embedded default's values and comments
(captionjax/configs/default.py).
"""

import ml_collections

from captionjax import configs


def get_config() -> ml_collections.ConfigDict:
  c = configs.load_config("default")

  # ---- data: `captionjax prepro --tfds=coco_captions ... --image_size=224`
  c.dataset = "data/coco_224"  # the prepro output directory
  c.batch_size = 16  # images per batch (NeuralTalk2's batch_size)
  c.seq_per_img = 5  # captions per image (NeuralTalk2's seq_per_img)
  c.crop_size = 0  # images are stored at VGG16's 224x224 (NeuralTalk2 cropped 224 of 256)
  c.flip = False  # no flips (NeuralTalk2 had none)

  # ---- model: NeuralTalk2's
  c.model.cnn = "vgg16"  # Simonyan & Zisserman's configuration D
  c.model.cnn_weights = "weights/vgg16_imagenet"  # `captionjax import-weights --output=` DIR
  c.model.cnn_kwargs = ml_collections.ConfigDict()
  c.model.cnn_kwargs.output = "fc7"  # 4096 features after fc7's ReLU, as NeuralTalk2's layer 38
  c.model.cnn_kwargs.dropout_rate = 0.5  # VGG16's fc dropout while fine-tuning
  c.model.cnn_kwargs.conv_per_image = False  # batched convolutions (the fast path on a GPU)
  # The input normalization of the weights ("caffe" for Keras's file, "torch" for
  # torchvision's); checked against weights.json when training starts. Set here,
  # captioning from the checkpoints does not need the weights directory.
  c.model.cnn_kwargs.preprocess = "caffe"
  c.model.input_encoding_size = 512  # NeuralTalk2's input_encoding_size
  c.model.rnn_size = 512  # NeuralTalk2's rnn_size
  c.model.num_layers = 1  # NeuralTalk2's num_layers
  c.model.drop_prob_lm = 0.5  # NeuralTalk2's drop_prob_lm
  c.model.rnn_type = "lstm"  # NeuralTalk2's LSTM
  c.model.image_every_step = False  # NeuralTalk2: the image at the first step only
  c.model.attention = False  # NeuralTalk2: no attention (one fc7 vector per image)
  c.dtype = "bfloat16"  # mixed precision (parameters, loss and beam scores stay float32)

  # ---- no object pretraining: COCO has no object labels in the records
  c.cnn_pretrain_steps = 0  # the ImageNet weights are the CNN's pretraining

  # ---- caption training: frozen CNN, then fine-tuning (NeuralTalk2's two stages in one run)
  c.num_train_steps = 250_000  # caption steps in all (about 32 epochs of 123k images at 16)
  c.cached_features = False  # images through the CNN every step (needed to fine-tune)
  c.finetune_cnn_after = 100_000  # frozen CNN for 100k steps, then fine-tuning
  c.learning_rate = 4e-4  # NeuralTalk2's learning_rate
  c.beta1 = 0.8  # NeuralTalk2's optim_alpha
  c.beta2 = 0.999  # NeuralTalk2's optim_beta
  c.epsilon = 1e-8  # NeuralTalk2's optim_epsilon
  c.grad_clip = 0.1  # NeuralTalk2's grad_clip (element-wise)
  c.learning_rate_decay_start = -1  # NeuralTalk2's default: no decay
  c.learning_rate_decay_every = 50_000  # NeuralTalk2's default (used when decay starts)
  c.learning_rate_schedule = "neuraltalk2"  # NeuralTalk2's decay, for the LM and the CNN
  c.cnn_learning_rate = 1e-5  # NeuralTalk2's cnn_learning_rate
  c.cnn_weight_decay = 0.0  # NeuralTalk2's cnn_weight_decay
  c.cnn_beta1 = 0.8  # NeuralTalk2's cnn_optim_alpha
  c.cnn_beta2 = 0.999  # NeuralTalk2's cnn_optim_beta

  # ---- self-critical training after the caption steps (Rennie et al. 2017), with the
  # reference implementations' settings: the CNN fixed, Adam at a constant 5e-5, the
  # CIDEr-D reward with the training split's document frequencies, 5 samples per image
  # with the mean of the other 4 as the baseline (the "new self-critical" variant)
  c.scst_steps = 106_200  # 15 epochs of Karpathy's 113,287 training images at 16 per step
  c.scst_learning_rate = 5e-5  # constant, as self-critical.pytorch's RL stage
  c.scst_samples = 5  # captions sampled per image
  c.scst_baseline = "mean"  # "greedy" for Rennie et al.'s greedy-decoding baseline
  c.scst_finetune_cnn = False  # the CNN stays as the caption phase left it
  c.scst_xe_weight = 0.0  # the policy gradient alone

  # ---- evaluation, logging, checkpoints
  c.beam_size = 2  # NeuralTalk2's eval.lua default
  c.eval_every_steps = 2_500  # NeuralTalk2's save_checkpoint_every
  c.eval_num_images = 3_200  # NeuralTalk2's val_images_use
  c.eval_batch_size = 100  # images per evaluation batch
  c.test_split = "test"  # Karpathy's 5000 test images
  c.extra_test_splits = ()  # COCO has no held-out-combinations split
  c.log_every_steps = 100  # train_log.jsonl every N steps
  c.checkpoint_every_steps = 2_500  # NeuralTalk2's save_checkpoint_every
  c.keep_checkpoints = 3  # latest checkpoints kept
  return c
