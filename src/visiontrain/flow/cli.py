"""The flow task's command-line verbs: ``VERBS = {verb: (config schema, function)}``."""

from visiontrain.flow.task import VERBS

__all__ = ["VERBS"]
