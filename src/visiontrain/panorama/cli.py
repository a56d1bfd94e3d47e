"""The panorama task's command-line verbs: ``VERBS = {verb: (config schema, function)}``."""

from visiontrain.panorama.task import VERBS

__all__ = ["VERBS"]
