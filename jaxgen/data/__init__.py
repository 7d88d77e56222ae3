"""Data input: TFDS-prepared datasets read with grain."""
from jaxgen.data.pipeline import DatasetNotFoundError
from jaxgen.data.pipeline import default_data_config
from jaxgen.data.pipeline import make_iterator
from jaxgen.data.pipeline import num_examples
from jaxgen.data.pipeline import prepare_dataset
