__version__ = "0.1.0"

# The library's front door (the modules themselves are generated from nbs/ by nbdev_export; this file is not).
from .estimator import load_model, make, methods  # noqa: E402,F401
from .data import load_dataset, load_images  # noqa: E402,F401
