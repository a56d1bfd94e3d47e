"""The detect task's command-line verbs: ``VERBS = {verb: (config schema, function)}``."""

from visiontrain.detect.commands import VERBS

__all__ = ["VERBS"]
