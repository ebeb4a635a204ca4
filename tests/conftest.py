"""Root conftest. Its only job: being imported as ``tests.conftest`` puts the repository root on
``sys.path`` (pytest's default "prepend" import mode), so ``import tests.helpers...`` works at every
tier, also under a bare ``pytest`` that does not add the current directory."""
