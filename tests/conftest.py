import pathlib
import sys

# Make tests/reference.py importable as `reference` from every test folder.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
