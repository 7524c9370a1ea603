"""Input data: image sources, views, code records on disk, the code-extraction job and the grain training pipeline."""

from par_jax.data.codes import CodesMetadata, CodesSource, CorruptRecordError, SyntheticCodes, verify_codes
from par_jax.data.pipeline import make_eval_loader, make_train_loader, num_records
from par_jax.data.sources import DataSourceError, FolderSource, SyntheticImages, TfdsSource, make_image_source
from par_jax.data.views import make_views, num_views
