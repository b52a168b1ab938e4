"""Linear evaluation of a frozen pre-trained encoder: the protocol, in one locked config.

  aasp-linear-eval --config=configs/linear_eval.py --config.checkpoint=runs/quickstart \
      --config.task=data/sonicpi/task.csv          # the shared protocol (recommended)
  aasp-linear-eval --config=configs/linear_eval.py --config.checkpoint=runs/quickstart \
      --config.train=data/sonicpi/probe_train.csv --config.test=data/sonicpi/probe_test.csv

  aasp-linear-eval --config=configs/linear_eval.py:classifier=adamw \
      --config.checkpoint=runs/pretrain --config.dataset.name=esc50 \
      --config.dataset.root=/data/ESC-50-master --config.dataset.test_fold=1

Clip embeddings ([CLS, mean token] of the frozen encoder) are computed once per checkpoint, split
and front end and cached as .npz files, so trying other classifiers or seeds skips the encoder.
"""

from ml_collections import ConfigDict, config_dict


def get_config(arg: str | None = None) -> ConfigDict:
  options = dict(part.split('=', 1) for part in arg.split(',')) if arg else {}
  unknown = sorted(set(options) - {'classifier'})
  if unknown:
    raise ValueError(f'configs/linear_eval.py: unknown argument(s) {unknown}; known: classifier')
  config = ConfigDict()
  # The encoder: a training workdir, its checkpoints/ folder or checkpoints/<step>.
  config.checkpoint = config_dict.placeholder(str)
  config.step = config_dict.placeholder(int)  # default: the newest complete checkpoint
  config.which = 'teacher'  # or 'student'

  # The shared probe protocol (aasp_jax/evaluate/protocol.py: repeated group k-fold, ridge and
  # kNN, every feature): a task manifest with label and group columns ...
  config.task = config_dict.placeholder(str)
  # ... or a fixed split: a train and a test manifest (CSV / JSON Lines, one label per clip) ...
  config.train = config_dict.placeholder(str)
  config.test = config_dict.placeholder(str)
  # ... or a named dataset read by aasp_jax.evaluate.datasets (ESC-50 / US8K need test_fold).
  config.dataset = ConfigDict()
  config.dataset.name = config_dict.placeholder(str)
  config.dataset.root = config_dict.placeholder(str)
  config.dataset.test_fold = config_dict.placeholder(int)

  # Embedding.
  config.batch_size = 16  # clips per encoder pass
  config.min_samples = config_dict.placeholder(int)  # shorter clips are skipped (default: 1 window)
  config.cache = True
  config.cache_dir = config_dict.placeholder(str)  # default: <checkpoint workdir>/embedding_cache

  # The classifier: multinomial logistic regression on standardised embeddings, minimising
  # mean CE + l2 / 2 * ||W||^2, with l2 chosen from l2_grid by stratified cv_folds-fold CV on the
  # train split (or fixed by `l2`).
  #   'lbfgs': full batch, deterministic (every seed gives the same result).
  #   'adamw': minibatch AdamW (seeded minibatch order, cosine-decayed lr).
  config.classifier = options.get('classifier', 'lbfgs')
  config.l2_grid = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
  config.l2 = config_dict.placeholder(float)  # set: no cross-validation
  config.cv_folds = 5
  config.seeds = (0, 1, 2)
  config.adamw = ConfigDict()
  config.adamw.epochs = 100
  config.adamw.batch_size = 64
  config.adamw.lr = 1e-2
  # Decoupled weight decay on W (Loshchilov & Hutter), on top of the l2 term in the loss; 0 keeps
  # the objective identical to the L-BFGS classifier's.
  config.adamw.weight_decay = 0.0

  # Where the result JSON goes (default: <checkpoint workdir>/linear_eval_<which>_<step>.json).
  config.output = config_dict.placeholder(str)
  return config
