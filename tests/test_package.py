"""The public surface: every advertised name resolves to the real object."""

import importlib

import pytest

import flexigpt_kernels


@pytest.mark.parametrize("name", sorted(flexigpt_kernels._LAZY))
def test_lazy_public_names_resolve(name):
    value = getattr(flexigpt_kernels, name)
    module = importlib.import_module(flexigpt_kernels._LAZY[name])
    assert value is getattr(module, name)
    assert name in dir(flexigpt_kernels)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        flexigpt_kernels.nope  # noqa: B018
