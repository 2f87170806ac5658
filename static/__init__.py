"""The browser script and pages, installed as the package collector.static (see pyproject.toml).

This file makes that mapping a regular package, which setuptools' editable installs can map
(a namespace package under a mapped directory they cannot find).
"""
