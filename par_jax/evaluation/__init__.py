"""Evaluation of generators (PAR_SPEC section 11): FID, sFID, Inception Score, precision/recall, class consistency.

  metrics.py     the metrics on features (float64 Frechet distance, IS with splits, k-NN precision/recall in JAX)
  inception.py   the FID InceptionV3 in Flax NNX and its weight-file loader
  classifier.py  the project's Fashion-MNIST classifier (offline features for the demo)
  features.py    feature networks behind one interface; feature extraction over image batches
  resize.py      the release's bicubic resize and uint8 rule
  npz.py         ADM-compatible sample files (arr_0 uint8 N x H x W x 3), streamed
  evaluators.py  sampling -> features -> metrics; the metric registry; the training-loop plug-in
  job.py         the evaluate job: the full protocol, recorded (docs/evaluation.md)
"""
