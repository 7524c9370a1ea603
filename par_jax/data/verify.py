r"""Read and check every record of a codes directory before a long run (riegeli's chunk hashes, record sizes,
labels, code ranges); exit 1 naming the first bad shard and record.

    python -m par_jax.data.verify --codes_dir=DIR

Training does this by itself for codes up to `codes.VERIFY_AT_START_BYTES`; larger ones are checked as they are read.
"""

import sys

from absl import flags, logging

from par_jax.core import config_args
from par_jax.data import codes


def define_flags(fv: flags.FlagValues, argv) -> None:
    del argv
    flags.DEFINE_string("codes_dir", None, "The codes directory to check.", flag_values=fv)
    flags.mark_flags_as_required(["codes_dir"], flag_values=fv)


def main(argv=None) -> None:
    f = config_args.parse_flags(argv, define_flags, doc=__doc__)
    try:
        meta = codes.verify_codes(f.codes_dir)
    except (codes.CorruptRecordError, FileNotFoundError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    logging.info("%s: all %d records intact (%d views of %dx%d codes, vocabulary %d)", f.codes_dir, meta.count,
                 meta.num_views, *meta.grid_shape, meta.vocab_size)


if __name__ == "__main__":
    config_args.run(main)
