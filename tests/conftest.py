"""Shared fixtures. Tests on the real datasets need the data root ($DEEPCLUST_DATA): they skip when a dataset is
absent, unless DEEPCLUST_REQUIRE_DATA=1 (set by .ci/run), where a missing dataset fails the run instead."""
import os
import pytest
from deepclust_nb.data import DatasetNotFoundError, load_dataset

os.environ.setdefault('DEEPCLUST_PROGRESS', '0')


@pytest.fixture(scope='session')
def real_data():
    "Return a loader that skips (or fails under DEEPCLUST_REQUIRE_DATA=1) when a dataset is missing."
    def load(name, split='train'):
        try:
            return load_dataset(name, split)
        except DatasetNotFoundError as e:
            if os.environ.get('DEEPCLUST_REQUIRE_DATA') == '1': raise
            pytest.skip(f'{name} not in the data root: {e}')
    return load
