"""trimix's language profiles (``CODE.toml``) and the demo trio's two small GGUF models.

This folder installs as the ``trimix_models`` package so that a wheel carries what ``--lang`` needs;
:mod:`trimix_cpp.profiles` finds it through the package's location. It holds no code.
"""
