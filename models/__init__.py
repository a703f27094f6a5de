"""trimix's language profiles (``CODE.toml``) and the demo trio's two small GGUF models.

This folder installs as the ``trimix_models`` package so that a wheel carries what ``--lang`` needs;
:mod:`trimix_cpp.profiles` finds it through the package's location. It holds no code, only where the
demo data the README's examples read is installed: ``python -c "import trimix_models as m; print(m.DEMO_DATA)"``.
"""

from pathlib import Path

DEMO_DATA = Path(__file__).resolve().parent / "demo" / "data"
