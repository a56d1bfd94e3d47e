"""Detection datasets on disk → validated labels → the torch Dataset.

One module per layout (:mod:`.voc` MAR20/VOC, :mod:`.yolo`, :mod:`.coco`), the labels they produce and
the checks they share (:mod:`.labels`), the label cache (:mod:`.cache`), :func:`load_labels`
(:mod:`.load`) and :class:`DetectionDataset` (:mod:`.dataset`). The names below are the public ones.
"""

from visiontrain.detect.data.dataset import DetectionDataset, collate, collate_obb
from visiontrain.detect.data.labels import (
    IMAGE_SUFFIXES,
    DatasetError,
    ImageLabels,
    LabelSet,
    read_image,
)
from visiontrain.detect.data.load import detect_layout, load_labels

__all__ = ["IMAGE_SUFFIXES", "DatasetError", "DetectionDataset", "ImageLabels", "LabelSet", "collate", "collate_obb",
           "detect_layout", "load_labels", "read_image"]
