"""What a model makes: the catalog and the request both say it, so it lives apart from both."""

import enum


class Kind(enum.Enum):
    IMAGE = "image"
    VIDEO = "video"
