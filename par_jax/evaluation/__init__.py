"""Evaluation of generators (PAR_SPEC section 11): FID, sFID, Inception Score, precision/recall, class consistency.

  settings.py    EvalSettings: config.eval read once, checked, frozen
  metrics.py     the metrics on features (float64 Frechet distance, IS with splits, k-NN precision/recall in JAX)
                 and the metric registry (name -> function of sample and reference features)
  features.py    feature networks behind one interface; feature extraction over image batches
  inception.py   the FID InceptionV3 in Flax NNX and its weight-file loader
  classifier.py  the project's Fashion-MNIST classifier (offline features for the demo)
  reference.py   reference sets (ADM .npz or an image source) and their features
  generate.py    draw samples on every process and decode them to images
  resize.py      the release's bicubic resize and uint8 rule
  npz.py         ADM-compatible sample files (arr_0 uint8 N x H x W x 3), streamed
  job.py         the evaluate job: the full protocol, recorded (docs/evaluation.md)
  plugin.py      the same protocol every N training steps (training-loop plug-in `eval`)
  grids.py       sample grids every N training steps (training-loop plug-in `samples`)
"""
