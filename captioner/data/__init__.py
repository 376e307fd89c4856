"""Stage 1, data: dataset records (one reader per on-disk layout), the vocabulary, training pairs.

The readers in `readers/` register themselves with `records.register` when imported; importing them here
means `load_records` knows every format whichever module was imported first, and the registry itself
never imports its members.
"""

from captioner.data.readers import coco, flickr, imagefolder, karpathy  # noqa: F401  (registers the readers)
