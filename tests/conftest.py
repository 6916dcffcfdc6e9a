import os
import sys

# Spawned ranks unpickle test functions by module name: make `tests.*` and `helpers` importable in them too.
sys.path.insert(0, os.path.dirname(__file__))
