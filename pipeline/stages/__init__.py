"""Stage modules; importing this package registers every stage.

Adding a stage is adding one module here and listing it below.
"""
from . import bundle, model  # noqa: F401  (import registers the stages)
