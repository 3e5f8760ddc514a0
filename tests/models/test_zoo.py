"""models.load: what it refuses before any loading."""

from __future__ import annotations

import pytest

from duat_kernels.models import load


@pytest.mark.parametrize("name,exc,message", [
    (5, TypeError, r"name_or_path must be a file path \(a str or os.PathLike\), got int 5"),  # pathlib's
    (None, TypeError, "name_or_path must be a file path .*got NoneType None"),  # "expected str, bytes or os.PathLike"
    # '' is Path('.'): the working directory was taken for a model folder ("model folder '' has no config.json")
    ("", ValueError, "the model name or path is empty"),
    ("  ", ValueError, "the model name or path is empty"),
])
def test_load_names_a_model_that_is_no_name_or_path(name, exc, message):
    with pytest.raises(exc, match=message):
        load(name)
