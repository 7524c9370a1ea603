"""The evaluation the training loop runs every N steps: the evaluate job's protocol on fewer samples.

A `par_jax.training.evaluators` plug-in, registered as `eval`:

    config.evals.eval = dict(every_steps=5000, num_samples=1000, metrics="fid,is,precision_recall",
                             fid_min_samples=2)

Keys other than `every_steps` and `fn` override fields of `config.eval`; sampling uses `config.sample`. The training
loop builds one `GenerationMetrics` per entry before the first step (the constructor checks that the inputs exist, so
a typo fails in seconds) and calls it at each evaluation step. The object holds what is reused between calls: the
feature network, the reference features and the tokenizer, built at the first call.
"""

from __future__ import annotations

import jax

from par_jax import sampling
from par_jax.core import paths
from par_jax.data import pipeline
from par_jax.evaluation import features as features_lib
from par_jax.evaluation import generate, metrics, reference, video_reference
from par_jax.evaluation.settings import EvalSettings


def check(settings: EvalSettings, video: bool = False) -> None:
    """Cheap checks before training starts: the feature network's weights, the reference set and the tokenizer
    exist (metric names and modes were checked when the settings were made)."""
    features_lib.check(settings)
    if video != (settings.feature_network in features_lib.VIDEO_NETWORKS):
        raise ValueError(f"config.eval.feature_network={settings.feature_network!r} is "
                         f"{'an image' if video else 'a video'} network, but this decoder makes "
                         f"{'clips' if video else 'images'}.")
    (video_reference if video else reference).check(settings)
    tokenizer = settings.require_tokenizer()
    if not paths.exists(tokenizer):
        raise FileNotFoundError(f"tokenizer {tokenizer!r} does not exist.")


class GenerationMetrics:
    """Metrics of `num_samples` fresh samples of the current model: {metric: value} (eval/<name>/<metric>)."""

    def __init__(self, config, **overrides):
        self.settings = EvalSettings.from_config(config, **overrides)
        self.sample_settings = sampling.SampleSettings.from_config(config.sample)
        self.video = len(config.model.grid_shape) == 3  # a (t, h, w) decoder: clips, scored by a video network
        check(self.settings, self.video)
        self.network: features_lib.FeatureNetwork | None = None
        self.reference: features_lib.Features | None = None
        self.tokenizer = None
        self.codes_dir = pipeline.training_codes_dir(config)

    def _setup(self, model) -> None:
        if self.network is None:
            from par_jax import tokenizer as tokenizer_lib  # noqa: PLC0415
            self.network = features_lib.build(self.settings)
            metrics.check_network(self.settings.metrics, self.network)
            self.tokenizer = tokenizer_lib.load(self.settings.tokenizer, codes_dir=self.codes_dir)
            if self.video:  # reference clips of the length and size the samples decode to
                frames, size = generate.sample_shape(model.config, self.tokenizer, 0)[:2]
                self.reference, _ = video_reference.features(self.settings, self.network, num_frames=frames,
                                                             frame_size=size, resolution=self.settings.resolution)
            else:
                self.reference, _ = reference.features(self.settings, self.network)

    def __call__(self, model, config=None, *, step: int, workdir=None, writer=None) -> dict[str, float]:
        """`config` and `workdir` are the loop's (settings were read at construction; results go through the loop's
        writer, so nothing is written here)."""
        del config, workdir, writer
        self._setup(model)
        s = self.settings
        labels = generate.make_labels(s.num_samples, model.config.num_classes, s.labels, s.seed)
        collector = features_lib.FeatureCollector(self.network)
        for images, part in generate.generate(model, self.tokenizer, labels, self.sample_settings,
                                              key=jax.random.key(s.seed), batch_size=s.batch_size,
                                              resolution=s.resolution, what=f"eval samples at step {step}"):
            collector.add(images, part, local=True)
        return metrics.compute(s.metrics, collector.result(), self.reference, self.network, s)
