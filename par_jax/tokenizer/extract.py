r"""The extract_codes job: encode an image source's views with a trained tokenizer into the codes the decoder
trains on. It lives here, where its inputs meet (`par_jax.data` reads the images and writes the codes format; the
tokenizer encodes).

    python -m par_jax.main --config=configs/par.py:size=XL,res=384 --job=extract_codes --workdir=DIR \
        --config.data.image_source=tfds:imagenet2012 --config.data.tokenizer=PATH [--config.data.codes_dir=OUT]
"""

from __future__ import annotations

import os

from absl import logging
from etils import epath

from par_jax import tokenizer as tokenizer_lib
from par_jax.core.config_args import UsageError
from par_jax.data import codes, extract, sources


def run(config, workdir: str) -> codes.CodesMetadata | None:
    """The extract_codes job: `config.data` names the image source, views, tokenizer and output directory."""
    data = config.data
    if not data.tokenizer:
        raise UsageError("extract_codes needs --config.data.tokenizer=PATH, a trained tokenizer (train one with "
                         "--job=train_tokenizer).")
    out_dir = data.codes_dir or os.fspath(epath.Path(workdir) / "codes")
    source = sources.make_image_source(
        data.image_source, split=data.split, data_dir=data.tfds_data_dir or None, download=data.download,
        image_size=data.image_size, num_classes=config.model.num_classes, count=data.synthetic_count,
        seed=data.seed)
    encoder = tokenizer_lib.load(data.tokenizer)
    logging.info("extract_codes: %s (%d images, %d classes) -> %s with tokenizer %s", source.name, len(source),
                 source.num_classes, out_dir, data.tokenizer)
    if source.num_classes > config.model.num_classes:
        raise UsageError(f"{source.name} has {source.num_classes} classes but config.model.num_classes is "
                         f"{config.model.num_classes}.")
    return extract.extract_codes(encoder, source, out_dir, image_size=data.image_size, views=data.views,
                                 crop_ratio=data.crop_ratio, flip_views=data.flip_views,
                                 batch_size=data.extract_batch_size, records_per_shard=data.records_per_shard,
                                 tokenizer_id=data.tokenizer, tokenizer_fingerprint=tokenizer_lib.fingerprint(encoder),
                                 expected_grid_shape=config.model.grid_shape, workers=data.extract_workers)
