"""The core library: the configuration, data, models, the defenses and the online learner they guard.

It imports nothing from the deployment, the adversary or the command line (the import contracts in
pyproject.toml say so, and tests/test_lint.py checks them).
"""
